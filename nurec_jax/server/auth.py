"""Who may call the server: TLS material, the bearer token, loopback checks.

Transport security (TLS, and client certificates for mTLS) is gRPC's own, configured here from PEM
files. The bearer token is checked by `BearerTokenInterceptor`, a grpc.aio server interceptor, so no
handler has to remember it: every method except the standard health service needs the metadata
`authorization: Bearer <token>`, compared in constant time. `is_loopback_peer` decides whether a
call comes from this machine (the rule for `shut_down`), and `exposure_warning` says when a server
is reachable from the network without protection. `BearerTokenClientInterceptor` is the client half
(render-grpc).
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import ssl

import grpc

AUTH_KEY = "authorization"
HEALTH_PREFIX = "/grpc.health.v1.Health/"  # open without a token: load balancers and probes carry none
_MAX_TOKEN_BYTES = 4096


def read_file(path: str, flag: str) -> bytes:
    """The bytes of a security file; ValueError naming the flag when it cannot be read or is empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path!r}: {e.strerror or e}") from None
    if not data.strip():
        raise ValueError(f"{flag}: {path!r} is empty")
    return data


def read_token(path: str, flag: str = "--auth-token-file") -> str:
    """The token in a token file (surrounding whitespace, e.g. a final newline, is dropped). It must be
    printable ASCII without spaces, since it travels in an HTTP/2 header."""
    data = read_file(path, flag)
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{flag}: {path!r} must hold printable ASCII (the token is sent as a header)") from None
    if len(token) > _MAX_TOKEN_BYTES:
        raise ValueError(f"{flag}: {path!r} holds more than {_MAX_TOKEN_BYTES} bytes")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError(f"{flag}: {path!r} must hold one token of printable ASCII without spaces")
    return token


def _no_password():
    raise ValueError("encrypted private keys are not supported")


def check_key_pair(
    cert_file: str, key_file: str, cert_flag: str = "--tls-cert-file", key_flag: str = "--tls-key-file"
) -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM), after checking both parse and belong together."""
    cert, key = read_file(cert_file, cert_flag), read_file(key_file, key_flag)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ValueError(f"{cert_flag}: {cert_file!r} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"{key_flag}: {key_file!r} holds no PEM private key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_file, key_file, password=_no_password)
    except ValueError as e:
        raise ValueError(f"{key_flag}: {key_file!r}: {e}") from None
    except ssl.SSLError as e:
        raise ValueError(
            f"{key_flag}: {key_file!r} is not the private key of {cert_flag} {cert_file!r} ({e.reason or e})"
        ) from None
    return cert, key


def check_ca(ca_file: str, flag: str) -> bytes:
    """The PEM bytes of a CA bundle, after checking that it holds at least one certificate."""
    data = read_file(ca_file, flag)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca_file)
    except ssl.SSLError as e:
        raise ValueError(f"{flag}: {ca_file!r} holds no usable PEM certificate ({e.reason or e})") from None
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None) -> grpc.ServerCredentials:
    """TLS credentials; with a client CA, clients must present a certificate it signed (mTLS)."""
    cert, key = check_key_pair(cert_file, key_file)
    client_ca = None if client_ca_file is None else check_ca(client_ca_file, "--tls-client-ca-file")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


# ----------------------------------------------------------------------------------------
# Loopback


def _is_loopback_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an ipv6 zone ("fe80::1%eth0")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is ipv4 loopback
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def is_loopback_peer(peer: str | None) -> bool:
    """Whether a gRPC peer string (`context.peer()`) is this machine: ipv4 127.0.0.0/8, ipv6 ::1
    (also as ::ffff:127.x), or a unix socket. Anything unparsable counts as remote."""
    if not peer:
        return False
    kind, _, rest = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind == "ipv4":
        return _is_loopback_ip(rest.rsplit(":", 1)[0])
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        return _is_loopback_ip(host.strip("[]"))
    return False


def is_loopback_address(address: str) -> bool:
    """Whether a bind address (`host:port`, `[v6]:port`, `unix:path`) only accepts local connections."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    return host.lower() == "localhost" or _is_loopback_ip(host)


def exposure_warning(address: str, tls: bool, token: bool, client_ca: bool) -> str | None:
    """The start-up warning for a server others can reach without protection, or None."""
    if is_loopback_address(address):
        return None
    missing = []
    if not tls:
        missing.append("no TLS (--tls-cert-file/--tls-key-file): traffic is plaintext")
    if not (token or client_ca):
        missing.append(
            "no authentication (--auth-token-file or --tls-client-ca-file): anyone who can reach "
            "the port may render, edit scenes and register files"
        )
    if not missing:
        return None
    return f"serving on {address}, reachable from other machines, with " + "; and ".join(missing)


# ----------------------------------------------------------------------------------------
# Bearer token


def _deny(message: str, request_streaming: bool, response_streaming: bool) -> grpc.RpcMethodHandler:
    """A handler of the right shape that answers UNAUTHENTICATED without reading the request (no
    deserializer: nothing a caller without the token sends gets parsed)."""

    async def unary_reply(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream_reply(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield None  # never reached; makes this an async generator, the streaming-reply shape

    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_reply)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_reply)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_reply)
    return grpc.unary_unary_rpc_method_handler(unary_reply)


def bearer_token_of(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` entry (scheme case-insensitive), or None."""
    for item in metadata or ():
        key, value = item
        if key.lower() != AUTH_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def token_matches(sent: str | None, expected: str) -> bool:
    """Constant-time comparison (hmac.compare_digest), so timing does not reveal a prefix."""
    if sent is None:
        return False
    return hmac.compare_digest(sent.encode("latin-1", "replace"), expected.encode("ascii"))


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health without the right `authorization: Bearer <token>` metadata."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = (HEALTH_PREFIX,)):
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._token = token
        self._open = open_prefixes

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        sent = bearer_token_of(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if token_matches(sent, self._token):
            return handler
        message = (
            f"{AUTH_KEY} metadata is missing: send '{AUTH_KEY}: Bearer <token>'"
            if sent is None
            else f"{AUTH_KEY} metadata: the bearer token is not accepted"
        )
        # Unknown methods get UNAUTHENTICATED too, so a caller without the token learns nothing.
        if handler is None:
            return _deny(message, False, False)
        return _deny(message, handler.request_streaming, handler.response_streaming)


# ----------------------------------------------------------------------------------------
# Client side (render-grpc)

_CallDetails = collections.namedtuple(
    "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
)


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    pass


class BearerTokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call on a channel (`grpc.intercept_channel`)."""

    def __init__(self, token: str):
        self._entry = (AUTH_KEY, f"Bearer {token}")

    def _details(self, d):
        metadata = [m for m in (d.metadata or ()) if m[0].lower() != AUTH_KEY] + [self._entry]
        return _ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def client_channel(
    target: str,
    options=(),
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    server_name: str | None = None,
    token_file: str | None = None,
) -> grpc.Channel:
    """A channel for render-grpc: TLS when a CA (or a client certificate) is given, the token on every
    call when a token file is. Raises ValueError naming the client flag on bad input."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("--tls-cert-file and --tls-key-file go together (the client certificate and its key)")
    options = list(options)
    tls = ca_file is not None or cert_file is not None
    if server_name is not None:
        if not tls:
            raise ValueError("--tls-server-name needs --tls-ca-file (it names the server in the TLS handshake)")
        options.append(("grpc.ssl_target_name_override", server_name))
    token = None if token_file is None else read_token(token_file)
    if tls:
        ca = None if ca_file is None else check_ca(ca_file, "--tls-ca-file")
        cert = key = None
        if cert_file is not None:
            cert, key = check_key_pair(cert_file, key_file)
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token is not None:
        channel = grpc.intercept_channel(channel, BearerTokenClientInterceptor(token))
    return channel
