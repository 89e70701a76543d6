#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter: PATH first, then pyenv's versions.
# Exits 1 with a clear message when there is none.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for name in python3.12 python3.13 python3.14 python3 python; do
  if path=$(command -v "$name" 2>/dev/null) && ok "$path"; then
    "$path" -c 'import sys; print(sys.executable)'; exit 0
  fi
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for dir in $(ls -d "$root"/versions/3.12* 2>/dev/null | sort -rV) $(ls -d "$root"/versions/3.1[3-9]* 2>/dev/null | sort -V); do
    for exe in "$dir"/bin/python3.1[2-9] "$dir"/bin/python3; do
      if [ -x "$exe" ] && ok "$exe"; then echo "$exe"; exit 0; fi
    done
  done
fi
echo "error: nurec-jax needs Python >= 3.12 (JAX 0.11.2 requires it); none found on PATH or in pyenv." >&2
echo "       Install one (e.g. 'pyenv install 3.12') or put python3.12 on PATH." >&2
exit 1
