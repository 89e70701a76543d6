"""`--profiling-backend` (NRE's flag): named ranges around server stages for an external profiler, and with
the JAX backend a trace of the whole run. NONE, JAX (`jax.profiler` trace + `TraceAnnotation` ranges) or
NVTX (`nvtx.annotate` ranges for Nsight Systems, plus `TraceAnnotation`); NRE's TRACY is refused.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading

_LOGGER = logging.getLogger(__name__)

PROFILING_BACKENDS = ("NONE", "TRACY", "NVTX", "JAX")  # TRACY is NRE's and is refused here


class _JaxRange:
    __slots__ = ("_ann",)

    def __init__(self, name: str):
        import jax.profiler

        self._ann = jax.profiler.TraceAnnotation(name)

    def __enter__(self):
        self._ann.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ann.__exit__(*exc)


class _NvtxRange:
    __slots__ = ("_nvtx", "_jax")

    def __init__(self, nvtx, name: str):
        self._nvtx = nvtx.annotate(name)
        self._jax = _JaxRange(name)

    def __enter__(self):
        self._nvtx.__enter__()
        self._jax.__enter__()
        return self

    def __exit__(self, *exc):
        self._jax.__exit__(*exc)
        self._nvtx.__exit__(*exc)


class Profiler:
    """`--profiling-backend`: named ranges around server stages, and (JAX) a trace of the whole run.

    - NONE: `range()` is a shared no-op; `start()`/`stop()` do nothing.
    - JAX (nurec-jax only): `start()` begins `jax.profiler.start_trace(trace_dir)` (TensorBoard/XProf and
      Perfetto files under `<trace_dir>/plugins/profile/<run>/`), `stop()` ends it; ranges are
      `jax.profiler.TraceAnnotation`s. Needs `trace_dir`.
    - NVTX: ranges are `nvtx.annotate(name)` (seen by `nsys profile`) plus a `TraceAnnotation`;
      `start()`/`stop()` do nothing (the external profiler owns the capture). Needs the `nvtx` package.
    - TRACY: refused (NRE's C++ profiler).

    Args:
        backend: one of PROFILING_BACKENDS (case-insensitive).
        trace_dir: JAX backend's output directory (created on `start()`).

    Raises:
        ValueError: naming the flag, for TRACY, an unknown backend, NVTX without `nvtx`, or JAX without
            `trace_dir`.
    """

    def __init__(self, backend: str = "NONE", trace_dir: str | None = None):
        b = str(backend).upper()
        if b == "TRACY":
            raise ValueError(
                "--profiling-backend TRACY: Tracy is NRE's C++ profiler and is not available "
                "in nurec-jax; use JAX (jax.profiler trace) or NVTX (Nsight Systems ranges)"
            )
        if b not in PROFILING_BACKENDS:
            raise ValueError(f"--profiling-backend {backend!r}: choose one of NONE, JAX, NVTX")
        self._nvtx = None
        if b == "NVTX":
            try:
                self._nvtx = importlib.import_module("nvtx")
            except ImportError as e:
                raise ValueError("--profiling-backend NVTX needs the nvtx package (pip install nvtx)") from e
        if b == "JAX" and not trace_dir:
            raise ValueError("--profiling-backend JAX needs a trace directory")
        self.backend = b
        self.trace_dir = os.path.abspath(os.path.expanduser(trace_dir)) if trace_dir else None
        self._tracing = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.backend != "NONE"

    @property
    def tracing(self) -> bool:
        """True between `start()` and `stop()` of the JAX backend."""
        return self._tracing

    def start(self) -> None:
        """Begins the JAX trace (other backends: nothing). Idempotent."""
        if self.backend != "JAX":
            return
        with self._lock:
            if not self._tracing:
                import jax.profiler

                os.makedirs(self.trace_dir, exist_ok=True)
                jax.profiler.start_trace(self.trace_dir)
                self._tracing = True
                _LOGGER.info("JAX profiler trace started: %s", self.trace_dir)

    def stop(self) -> None:
        """Ends and writes the JAX trace (other backends, or not started: nothing). Idempotent."""
        with self._lock:
            if self._tracing:
                import jax.profiler

                self._tracing = False
                jax.profiler.stop_trace()
                _LOGGER.info("JAX profiler trace written under %s", self.trace_dir)

    def range(self, name: str):
        """Context manager marking `name` in the profile."""
        if self.backend == "JAX":
            return _JaxRange(name)
        if self.backend == "NVTX":
            return _NvtxRange(self._nvtx, name)
        return contextlib.nullcontext()

    def __enter__(self) -> Profiler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
