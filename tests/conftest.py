"""Settings for the whole test run. Imports: the scripts in tools/ are the package `tools` (pyproject.toml sets
pytest's `pythonpath` to the repository root); helper modules beside the tests (render_fixtures, lidar_fixtures,
kernels/kernel_inputs, server/grpc_helpers, ...) import by name, as pytest's default `prepend` import mode puts
the directory of each test module and conftest.py on sys.path. Test modules never import each other."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One persistent XLA compilation cache for the whole run: the two xdist workers and the CLIs the tests
# start as subprocesses compile many of the same programs (the thin scene at 64x36, ...); each is
# compiled once. Keys are the HLO, JAX version and backend, so a code change never reuses a stale entry.
# NURECJAX_TEST_COMPILE_CACHE=0 turns it off.
if os.environ.get("NURECJAX_TEST_COMPILE_CACHE", "1") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax-tests"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
