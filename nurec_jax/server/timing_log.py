"""The server-wide timing log (NRE's `--timing-verbosity`, `--timing-logfile`, `--metrics-output-dir`).

`TimingLog` collects `StageTimer.record()` of every request, logs them at the chosen verbosity, keeps a
summary (get_server_config's `timing.*` keys) and writes `metrics.yaml` (`metrics_yaml.py`).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import threading
import time
from typing import Any, Callable

import numpy as np

from nurec_jax.fileio import atomic_file
from nurec_jax.server.metrics_yaml import METRICS_FILENAME, metrics_yaml

_LOGGER = logging.getLogger(__name__)

TIMING_VERBOSITIES = ("NONE", "SUMMARY", "BASIC", "DETAILS")
WARMUP_RENDERS = 3  # NRE's metrics.yaml skips the first renders (compiles, allocator growth)
RENDER_STAGE = "render"  # the stage whose ms is a metrics.yaml render-time sample
TOTAL = "total"  # the pseudo-stage holding a request's total ms in summaries
MAX_SAMPLES = 10_000  # per series: count/mean/max stay exact, percentiles and samples_ms use the newest


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
        return {
            "count": self.count,
            "mean_ms": self.sum / self.count,
            "p50_ms": float(p50),
            "p95_ms": float(p95),
            "max_ms": self.max,
        }


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

    def __init__(
        self,
        verbosity: str = "BASIC",
        logfile: str | None = None,
        metrics_output_dir: str | None = None,
        *,
        warmup_renders: int = WARMUP_RENDERS,
        flush_interval_s: float = 10.0,
        max_samples: int = MAX_SAMPLES,
        clock: Callable[[], float] = time.monotonic,
    ):
        v = str(verbosity).upper()
        if v not in TIMING_VERBOSITIES:
            raise ValueError(f"--timing-verbosity {verbosity!r}: choose one of {', '.join(TIMING_VERBOSITIES)}")
        self.verbosity = v
        self.logfile = _check_logfile(logfile) if logfile else None
        self.metrics_path = (
            os.path.join(_check_metrics_dir(metrics_output_dir), METRICS_FILENAME) if metrics_output_dir else None
        )
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
                self._write_line(
                    {
                        "time": round(time.time(), 6),
                        "method": method,
                        "scene_id": scene_id,
                        "total_ms": round(total_ms, 4),
                        "stages": {k: round(v, 4) for k, v in stages.items()},
                    }
                )
        if self.per_request:
            _LOGGER.info(
                "timing %s scene=%s total=%.2f ms | %s",
                method,
                scene_id,
                total_ms,
                " ".join(f"{k}={v:.2f}" for k, v in stages.items()),
            )
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
                out[method] = {
                    "count": st["count"],
                    "warmup_skipped": min(seen, self._warmup),
                    **{k: st.get(k) for k in ("mean_ms", "p50_ms", "p95_ms", "max_ms")},
                    "samples_ms": list(s.recent) if s is not None else [],
                    "stage_mean_ms": {k: v[0] / v[1] for k, v in sums.items()},
                }
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
            rows.append(
                (
                    method,
                    name,
                    str(st["count"]),
                    *(f"{st[k]:.2f}" if k in st else "-" for k in ("mean_ms", "p50_ms", "p95_ms", "max_ms")),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )
