#!/usr/bin/env bash
# One GPU check, within 8 minutes: on a GPU machine with our pinned JAX (0.11.2 with its CUDA plugin),
# install what the image lacks from wheels carried in .whl/ (fetched beforehand by tools/gpu_wheels.sh,
# where PyPI is reachable), run the kernel tests compiled on the GPU, and write the benchmark figures
# (tools/gpu_figures.py) into one figures file.
#
#   bash tools/gpu_wheels.sh                 # here, once
#   bash tools/gpu_check.sh [OUT_DIR]        # on the GPU machine, in the repo root (OUT_DIR: $OUT or gpu_out)
#
# Writes OUT_DIR/kernel_tests.log, OUT_DIR/figures.log and OUT_DIR/gpu_figures.json; exits non-zero when
# the machine has no GPU backend or a kernel test fails (the figures still run after a failure).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nurec_site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/nurec_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
unset JAX_PLATFORMS
"$PY" - <<'PY' || exit 1
import jax
print("JAX", jax.__version__, "backend", jax.default_backend(), "devices", jax.devices())
assert jax.__version__ == "0.11.2", "this project is verified with JAX 0.11.2"
assert jax.default_backend() == "gpu", "no GPU backend: is the jax CUDA plugin installed?"
import pxr, grpc, google.protobuf  # noqa: F401  (carried when missing)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
# Kernel tests: on a GPU backend the Pallas kernels compile for the GPU (no interpret mode).
timeout 200 "$PY" -m pytest -q -x -p no:cacheprovider tests/kernels 2>&1 | tee "$out/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 250 "$PY" tools/gpu_figures.py --out="$out/gpu_figures.json" 2>&1 | tee "$out/figures.log"
figures_rc=${PIPESTATUS[0]}
echo "kernel tests rc=$tests_rc, figures rc=$figures_rc; figures in $out/gpu_figures.json"
[ "$tests_rc" = 0 ] && [ "$figures_rc" = 0 ]
