#!/usr/bin/env bash
# Makes the TLS material the server tests use (tests/data/tls/): a test CA, a server certificate for
# localhost / 127.0.0.1 / ::1 and a client certificate signed by it, and a client certificate from a
# second, unrelated CA (which an mTLS server must refuse). Keys are P-256 and the certificates last 100
# years, so the committed files never need regenerating; the tests read them and never run openssl.
# CA private keys are thrown away: rerunning the script replaces every file.
#
#   tools/make_test_certs.sh [output dir, default tests/data/tls]
set -euo pipefail

out="${1:-$(cd "$(dirname "$0")/.." && pwd)/tests/data/tls}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
days=36500

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ca() {  # ca NAME CN
  key "$work/$1.key"
  openssl req -x509 -new -key "$work/$1.key" -sha256 -days "$days" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$work/$1.pem"
}

leaf() {  # leaf NAME CA CN EXTENSIONS
  key "$work/$1.key"
  openssl req -new -key "$work/$1.key" -subj "/CN=$3" -out "$work/$1.csr"
  printf '%s\n' "$4" > "$work/$1.ext"
  openssl x509 -req -in "$work/$1.csr" -CA "$work/$2.pem" -CAkey "$work/$2.key" -CAcreateserial \
    -sha256 -days "$days" -extfile "$work/$1.ext" -out "$work/$1.pem" 2>/dev/null
}

ca ca "nurec-jax test CA"
ca other-ca "nurec-jax other test CA"
leaf server ca localhost "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
leaf client ca "nurec-jax test client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
leaf other-client other-ca "nurec-jax other test client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
# Everything is made in a scratch directory first, so a failure leaves the old set intact.
for f in ca.pem other-ca.pem server.pem server.key client.pem client.key other-client.pem other-client.key; do
  install -m 644 "$work/$f" "$out/$f"
done
echo "wrote ca.pem other-ca.pem server.{pem,key} client.{pem,key} other-client.{pem,key} to $out"
