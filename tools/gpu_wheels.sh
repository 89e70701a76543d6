#!/usr/bin/env bash
# Downloads, here (where PyPI is reachable), the wheels tools/gpu_check.sh installs on a GPU machine that
# has no network: the packages its image lacks, at the versions constraints.txt pins. They land in .whl/
# (git-ignored); carry that folder to the machine with the working tree.
#
#   bash tools/gpu_wheels.sh            # then, on the GPU machine: bash tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pin() { grep -i "^$1==" constraints.txt | head -1; }
mkdir -p .whl
# Pure-Python or manylinux wheels for CPython 3.12 on x86-64 (the GPU machine's interpreter).
for pkg in usd-core grpcio protobuf grpcio-health-checking grpcio-reflection prometheus_client; do
  spec=$(pin "$pkg")
  [ -n "$spec" ] || { echo "no pin for $pkg in constraints.txt" >&2; exit 1; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$spec"
done
ls -la .whl
