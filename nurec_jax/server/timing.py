"""Per-request stage timing, render metrics and profiler ranges: NRE's `--enable-timing`,
`--timing-verbosity`, `--timing-logfile`, `--timing-synchronize`, `--metrics-output-dir` and
`--profiling-backend` (protocol.md 11.1).

Three pieces, wired by the server:

- `StageTimer`, one per request: `with timer.stage("compositing") as st: out = st.wait(f())` records the
  stage's wall milliseconds. `st.wait` blocks on device results only when synchronizing (JAX dispatch is
  asynchronous, so without it a device stage measures dispatch, and the wait lands in a later stage).
- `TimingLog`, one per server: collects `timer.record()` of every request, logs them at the chosen
  verbosity, keeps a summary and writes `<metrics-output-dir>/metrics.yaml`.
- `Profiler`: NONE, JAX (`jax.profiler` trace + `TraceAnnotation` ranges) or NVTX (`nvtx.annotate` ranges
  for Nsight Systems, plus `TraceAnnotation`). A timer given a profiler opens one range per stage.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import logging
import math
import os
import re
import threading
import time
from typing import Any, Callable, TypeVar

import numpy as np

from nurec_jax.fileio import atomic_file

_LOGGER = logging.getLogger(__name__)

TIMING_VERBOSITIES = ("NONE", "SUMMARY", "BASIC", "DETAILS")
PROFILING_BACKENDS = ("NONE", "TRACY", "NVTX", "JAX")  # TRACY is NRE's and is refused here
WARMUP_RENDERS = 3  # NRE's metrics.yaml skips the first renders (compiles, allocator growth)
METRICS_FILENAME = "metrics.yaml"
RENDER_STAGE = "render"  # the stage whose ms is a metrics.yaml render-time sample
TOTAL = "total"  # the pseudo-stage holding a request's total ms in summaries
MAX_SAMPLES = 10_000  # per series: count/mean/max stay exact, percentiles and samples_ms use the newest

_T = TypeVar("_T")


# ----------------------------------------------------------------------------------------------------
# StageTimer


class _NullStage:
    """The stage of a disabled timer: enters, exits and waits for nothing."""

    __slots__ = ()

    def __enter__(self) -> _NullStage:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def wait(self, value: _T) -> _T:
        return value


_NULL_STAGE = _NullStage()


class _Stage:
    """One open stage of an enabled timer (or of a profiler-only timer, when `timer` is None)."""

    __slots__ = ("_timer", "_name", "_range", "_t0")

    def __init__(self, timer: StageTimer | None, name: str, prange):
        self._timer = timer
        self._name = name
        self._range = prange

    def __enter__(self) -> _Stage:
        if self._timer is not None:
            self._timer._ms.setdefault(self._name, 0.0)  # entry order: `render` before its sub-stages
        if self._range is not None:
            self._range.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        t1 = time.perf_counter()
        if self._timer is not None:
            self._timer._add(self._name, self._t0, t1)
        if self._range is not None:
            self._range.__exit__(*exc)

    def wait(self, value: _T) -> _T:
        """Returns `value`; with `synchronize=True` first blocks until its device arrays are ready, so
        the stage's clock includes the device work (a pytree of arrays is fine)."""
        if self._timer is not None and self._timer.synchronize:
            import jax  # only a synchronizing timer needs it

            jax.block_until_ready(value)
        return value


class StageTimer:
    """Wall-clock milliseconds of a request's stages, in first-entry order.

    Args:
        enabled: False makes `stage()` return a shared no-op (a disabled timer records nothing), unless
            a profiler is given, in which case stages still open profiler ranges.
        synchronize: `--timing-synchronize`: `Stage.wait(x)` blocks on `x` (else it only returns it).
        profiler: open `profiler.range(name)` around each stage (ignored when None or backend NONE).

    A name entered twice (e.g. one `compositing` per camera) adds up; it keeps its first position.
    """

    def __init__(self, enabled: bool = True, synchronize: bool = False, profiler: Profiler | None = None):
        self.enabled = enabled
        self.synchronize = synchronize and enabled
        self._profiler = profiler if profiler is not None and profiler.enabled else None
        self._ms: dict[str, float] = {}
        self._first: float | None = None
        self._last: float | None = None
        self._lock = threading.Lock()  # a batch encodes one image on a host thread while the next renders

    def stage(self, name: str):
        """Context manager timing stage `name`; `as st` gives `st.wait(value) -> value`."""
        if self._profiler is None:
            return _Stage(self, name, None) if self.enabled else _NULL_STAGE
        return _Stage(self if self.enabled else None, name, self._profiler.range(name))

    def _add(self, name: str, t0: float, t1: float) -> None:
        with self._lock:
            self._ms[name] = self._ms.get(name, 0.0) + (t1 - t0) * 1e3
            if self._first is None or t0 < self._first:
                self._first = t0
            if self._last is None or t1 > self._last:
                self._last = t1

    def record(self) -> dict[str, float]:
        """{stage name: ms} in first-entry order (a copy; empty for a disabled timer)."""
        return dict(self._ms)

    def total_ms(self) -> float:
        """Wall ms from the start of the first stage to the end of the last one (nested stages such as
        `projection` inside `render` are not double counted; gaps between stages are included)."""
        if self._first is None:
            return 0.0
        return (self._last - self._first) * 1e3


# ----------------------------------------------------------------------------------------------------
# TimingLog


class _Series:
    """Exact count/sum/max plus the newest MAX_SAMPLES values (for percentiles)."""

    __slots__ = ("count", "sum", "max", "recent")

    def __init__(self, max_samples: int):
        self.count = 0
        self.sum = 0.0
        self.max = -math.inf
        self.recent: collections.deque[float] = collections.deque(maxlen=max_samples)

    def add(self, ms: float) -> None:
        self.count += 1
        self.sum += ms
        self.max = max(self.max, ms)
        self.recent.append(ms)

    def stats(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0}
        p50, p95 = np.percentile(np.asarray(self.recent, dtype=np.float64), [50.0, 95.0])
        return {"count": self.count, "mean_ms": self.sum / self.count, "p50_ms": float(p50),
                "p95_ms": float(p95), "max_ms": self.max}


def _check_logfile(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ValueError(f"--timing-logfile {path!r} is a directory")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise ValueError(f"--timing-logfile {path!r}: cannot create its directory ({e})") from e
    if not os.access(os.path.dirname(path), os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"--timing-logfile {path!r} is not writable")
    return path


def _check_metrics_dir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # also FileExistsError for an existing file
        raise ValueError(f"--metrics-output-dir {path!r}: cannot create the directory ({e})") from e
    if not os.access(path, os.W_OK):
        raise ValueError(f"--metrics-output-dir {path!r} is not writable")
    return path


class TimingLog:
    """The server-wide sink of request timings (thread-safe).

    | verbosity | per request                              | at `close()`                        |
    |-----------|------------------------------------------|-------------------------------------|
    | NONE      | nothing                                  | nothing                             |
    | SUMMARY   | nothing                                  | summary table (INFO) + logfile line |
    | BASIC     | one INFO line (total + stages), logfile  | nothing                             |
    | DETAILS   | as BASIC                                 | as SUMMARY                          |

    The logfile (`--timing-logfile`, optional) gets JSON lines: per request
    `{"time": unix s, "method", "scene_id", "total_ms", "stages": {name: ms}}` at BASIC/DETAILS, and
    `{"time", "summary": summary()}` at close for SUMMARY/DETAILS. It is opened on first use in append
    mode (parent directories created at construction), line-buffered. `summary()` works at any
    verbosity; it covers every request, warm-ups included.

    Metrics (`--metrics-output-dir`, optional, any verbosity): per method, the first `warmup_renders`
    requests are skipped and the rest kept as render-time samples (the `render` stage's ms, or the
    request total when there is no `render` stage) plus per-stage means; written to
    `<dir>/metrics.yaml` (see `metrics_yaml`) atomically on `flush()`, on `close()`, and by `add()` when
    `flush_interval_s` has passed since the last write.

    Args:
        verbosity: one of TIMING_VERBOSITIES (case-insensitive).
        logfile: JSON-lines path, or None.
        metrics_output_dir: directory for metrics.yaml, or None.
        warmup_renders: requests per method skipped by the metrics.
        flush_interval_s: at most this long between metrics.yaml writes while requests arrive.
        max_samples: per series, the newest samples kept for percentiles and `samples_ms`.
        clock: monotonic seconds (tests inject one).

    Raises:
        ValueError: naming the flag, for an unknown verbosity or an unusable path.
    """

    def __init__(self, verbosity: str = "BASIC", logfile: str | None = None,
                 metrics_output_dir: str | None = None, *, warmup_renders: int = WARMUP_RENDERS,
                 flush_interval_s: float = 10.0, max_samples: int = MAX_SAMPLES,
                 clock: Callable[[], float] = time.monotonic):
        v = str(verbosity).upper()
        if v not in TIMING_VERBOSITIES:
            raise ValueError(f"--timing-verbosity {verbosity!r}: choose one of {', '.join(TIMING_VERBOSITIES)}")
        self.verbosity = v
        self.logfile = _check_logfile(logfile) if logfile else None
        self.metrics_path = (os.path.join(_check_metrics_dir(metrics_output_dir), METRICS_FILENAME)
                             if metrics_output_dir else None)
        self._warmup = warmup_renders
        self._interval = flush_interval_s
        self._max_samples = max_samples
        self._clock = clock
        self._lock = threading.Lock()  # stats, file handle
        self._write_lock = threading.Lock()  # metrics.yaml writers
        self._file = None
        self._file_failed = False
        self._closed = False
        self._stats: dict[str, dict[str, _Series]] = {}  # method -> stage (and TOTAL) -> series
        self._seen: collections.Counter[str] = collections.Counter()  # requests per method (metrics)
        self._render: dict[str, _Series] = {}  # method -> render-time samples after warm-up
        self._stage_sums: dict[str, dict[str, list[float]]] = {}  # method -> stage -> [sum, count]
        self._last_write = clock()

    @property
    def per_request(self) -> bool:
        return self.verbosity in ("BASIC", "DETAILS")

    def add(self, method: str, scene_id: str, stages: dict[str, float], total_ms: float | None = None) -> None:
        """Records one request: `stages` is `StageTimer.record()`; `total_ms` defaults to the sum of the
        stages (pass `timer.total_ms()` when stages nest). Ignored after `close()`."""
        if total_ms is None:
            total_ms = sum(stages.values())
        flush = False
        with self._lock:
            if self._closed:
                return
            series = self._stats.setdefault(method, {})
            for name, ms in ((TOTAL, total_ms), *stages.items()):
                if name not in series:
                    series[name] = _Series(self._max_samples)
                series[name].add(ms)
            if self.metrics_path is not None:
                self._seen[method] += 1
                if self._seen[method] > self._warmup:
                    if method not in self._render:
                        self._render[method] = _Series(self._max_samples)
                    self._render[method].add(stages.get(RENDER_STAGE, total_ms))
                    sums = self._stage_sums.setdefault(method, {})
                    for name, ms in stages.items():
                        s = sums.setdefault(name, [0.0, 0])
                        s[0] += ms
                        s[1] += 1
                now = self._clock()
                flush = now - self._last_write >= self._interval
                if flush:  # claimed here, so concurrent adds do not all write
                    self._last_write = now
            if self.per_request and self.logfile is not None:
                self._write_line({"time": round(time.time(), 6), "method": method, "scene_id": scene_id,
                                  "total_ms": round(total_ms, 4),
                                  "stages": {k: round(v, 4) for k, v in stages.items()}})
        if self.per_request:
            _LOGGER.info("timing %s scene=%s total=%.2f ms | %s", method, scene_id, total_ms,
                         " ".join(f"{k}={v:.2f}" for k, v in stages.items()))
        if flush:
            self.flush()

    def _write_line(self, obj: dict[str, Any]) -> None:
        """Appends one JSON line (caller holds _lock); a failing logfile is reported once and dropped."""
        if self._file_failed:
            return
        try:
            if self._file is None:
                self._file = open(self.logfile, "a", buffering=1, encoding="utf-8")
            self._file.write(json.dumps(obj) + "\n")
        except OSError as e:
            self._file_failed = True
            _LOGGER.error("--timing-logfile %s: %s; timing lines are no longer written", self.logfile, e)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """{method: {"total" | stage: {count, mean_ms, p50_ms, p95_ms, max_ms}}} over all requests so far
        (percentiles over the newest `max_samples`); a series without samples has only `count: 0`."""
        with self._lock:
            return {m: {name: s.stats() for name, s in series.items()} for m, series in self._stats.items()}

    def metrics(self) -> dict[str, dict[str, Any]]:
        """What metrics.yaml holds, per method: {count, warmup_skipped, mean_ms, p50_ms, p95_ms, max_ms,
        samples_ms: [...], stage_mean_ms: {stage: ms}} (stats None before the first sample)."""
        with self._lock:
            out = {}
            for method, seen in self._seen.items():
                s = self._render.get(method)
                st = s.stats() if s is not None else {"count": 0}
                sums = self._stage_sums.get(method, {})
                out[method] = {"count": st["count"], "warmup_skipped": min(seen, self._warmup),
                               **{k: st.get(k) for k in ("mean_ms", "p50_ms", "p95_ms", "max_ms")},
                               "samples_ms": list(s.recent) if s is not None else [],
                               "stage_mean_ms": {k: v[0] / v[1] for k, v in sums.items()}}
            return out

    def flush(self) -> None:
        """Writes metrics.yaml now (atomically: temp file in the same directory, then os.replace)."""
        if self.metrics_path is None:
            return
        with self._write_lock:
            with self._lock:
                self._last_write = self._clock()
            text = metrics_yaml(self.metrics(), self._warmup)
            try:
                with atomic_file(self.metrics_path, "w", encoding="utf-8") as f:
                    f.write(text)
            except OSError as e:
                _LOGGER.error("--metrics-output-dir: cannot write %s: %s", self.metrics_path, e)

    def close(self) -> None:
        """Writes metrics.yaml, logs the summary (SUMMARY/DETAILS) and closes the logfile. Idempotent."""
        with self._lock:
            if self._closed:
                return
        self.flush()
        summary = self.summary() if self.verbosity in ("SUMMARY", "DETAILS") else None
        with self._lock:
            self._closed = True
            if summary is not None and self.logfile is not None:
                self._write_line({"time": round(time.time(), 6), "summary": summary})
            if self._file is not None:
                self._file.close()
                self._file = None
        if summary is not None:
            _LOGGER.info("timing summary (ms):\n%s", format_summary(summary))


def format_summary(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """`TimingLog.summary()` as a fixed-width table (method, stage, count, mean, p50, p95, max)."""
    rows = [("method", "stage", "count", "mean", "p50", "p95", "max")]
    for method, series in summary.items():
        for name, st in series.items():
            rows.append((method, name, str(st["count"]),
                         *(f"{st[k]:.2f}" if k in st else "-" for k in ("mean_ms", "p50_ms", "p95_ms", "max_ms"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


# ----------------------------------------------------------------------------------------------------
# metrics.yaml (written by hand: flat mappings and flow lists of floats, YAML 1.1 and 1.2 compatible)

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _yaml_key(key: str) -> str:
    if _PLAIN_KEY.match(key) and key.lower() not in _YAML_WORDS:
        return key
    return json.dumps(key)  # a JSON string is a valid YAML double-quoted scalar


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return ".nan"
    if math.isinf(v):
        return ".inf" if v > 0 else "-.inf"
    # Fixed point: always a '.', never an exponent (PyYAML's YAML 1.1 resolver reads "1e-05" as a string).
    return f"{v:.4f}"


def metrics_yaml(metrics: dict[str, dict[str, Any]], warmup_renders: int = WARMUP_RENDERS) -> str:
    """metrics.yaml text for `TimingLog.metrics()`:

        # nurec-jax render metrics ...
        warmup_renders: 3
        render_rgb:
          count: 2
          warmup_skipped: 3
          mean_ms: 11.0000
          ...
          samples_ms: [10.0000, 12.0000]
          stage_mean_ms:
            render: 11.0000
    """
    lines = ["# nurec-jax render metrics (--metrics-output-dir): render-time samples in ms, per method,",
             f"# after the first {warmup_renders} renders of each method (warm-up).",
             f"warmup_renders: {warmup_renders}"]
    for method, m in metrics.items():
        lines.append(f"{_yaml_key(method)}:")
        for key, v in m.items():
            if isinstance(v, dict):
                lines.append(f"  {key}:" + ("" if v else " {}"))
                lines.extend(f"    {_yaml_key(k)}: {_yaml_scalar(x)}" for k, x in v.items())
            elif isinstance(v, (list, tuple)):
                lines.append(f"  {key}: [{', '.join(_yaml_scalar(x) for x in v)}]")
            else:
                lines.append(f"  {key}: {_yaml_scalar(v)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Profiler


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
            raise ValueError("--profiling-backend TRACY: Tracy is NRE's C++ profiler and is not available "
                             "in nurec-jax; use JAX (jax.profiler trace) or NVTX (Nsight Systems ranges)")
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
