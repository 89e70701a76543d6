"""An optional HTTP view of server health: `GET /metrics` (Prometheus text format 0.0.4) and
`GET /healthz`, served by a stdlib `ThreadingHTTPServer` in a daemon thread; plus
`CompileCacheCounter`, which counts JAX persistent-compilation-cache hits and misses in-process.

The server never reads server state itself: it calls `snapshot_fn()` per scrape, which returns

    {
        "requests": {method: int},          # RPCs received, per gRPC method name (e.g. "render_rgb")
        "status": {code_name: int},         # RPCs answered, per grpc.StatusCode name ("OK", "NOT_FOUND")
        "latency_s": [float, ...],          # recent render latencies in seconds (a window, e.g. the last 1000)
        "latency_count": int,               # optional: all-time number of latencies (default len(latency_s))
        "latency_sum_s": float,             # optional: all-time sum in s (default sum(latency_s))
        "renders": int,                     # renders done (camera images + lidar sweeps)
        "scenes_loaded": [scene_id, ...],   # scenes whose model is in memory now
        "compiles": int,                    # XLA compilations (e.g. CompileCacheCounter.compiles)
        "compile_cache": {"hits": int, "misses": int},  # CompileCacheCounter.snapshot()
        "warmup_state": str,                # WarmupStatus.state: off | running | done | stopped | failed
    }

Missing keys read as zero / empty ("off" for warmup_state), so every family is always exposed.
"""

from __future__ import annotations

import http.server
import logging
import math
import threading
from typing import Any, Callable

import numpy as np

_LOGGER = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_QUANTILES = (0.5, 0.95)
WARMUP_STATES = ("off", "running", "done", "stopped", "failed")  # nurec_jax.server.warmup.WarmupStatus

# JAX monitoring events (jax 0.11.2, jax/_src/compiler.py, compilation_cache.py, dispatch.py).
CACHE_LOOKUP_EVENT = "/jax/compilation_cache/compile_requests_use_cache"  # a persistent-cache lookup
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # the lookup found an executable
# Named "misses" by JAX but recorded only when an entry is *written* (a miss whose compile took at least
# jax_persistent_cache_min_compile_time_secs and whose entry is at least ..._min_entry_size_bytes).
CACHE_WRITE_EVENT = "/jax/compilation_cache/cache_misses"
# A duration event around every compile-or-load of an executable (the in-memory cache missed); it
# includes executables loaded from the persistent cache.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# ------------------------------------------------------------------------------------ exposition text


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _family(lines: list[str], name: str, kind: str, help_text: str, samples) -> None:
    """Appends `# HELP`, `# TYPE` and `name{labels} value` lines; samples: [(suffix, {label: v}, value)]."""
    lines.append(f"# HELP {name} {_escape_help(help_text)}")
    lines.append(f"# TYPE {name} {kind}")
    for suffix, labels, value in samples:
        lab = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{suffix}{'{' + lab + '}' if lab else ''} {_fmt(value)}")


def render_prometheus(snapshot: dict[str, Any]) -> str:
    """The Prometheus text exposition (format 0.0.4) of a `snapshot_fn()` dict (module docstring).

    Label values are escaped per the format (backslash, double quote, newline); labelled samples are
    sorted by label value. Latency quantiles are over `latency_s` (NaN when it is empty).
    """
    lines: list[str] = []
    requests = snapshot.get("requests") or {}
    _family(lines, "nurec_requests_total", "counter", "gRPC requests received, by method.",
            [("", {"method": m}, requests[m]) for m in sorted(requests)])
    status = snapshot.get("status") or {}
    _family(lines, "nurec_responses_total", "counter", "gRPC responses sent, by status code.",
            [("", {"code": c}, status[c]) for c in sorted(status)])

    lat = np.asarray(snapshot.get("latency_s") or [], dtype=np.float64)
    qs = np.quantile(lat, LATENCY_QUANTILES) if lat.size else [math.nan] * len(LATENCY_QUANTILES)
    _family(lines, "nurec_render_latency_seconds", "summary",
            "Render latency in seconds (quantiles over recent renders).",
            [*(("", {"quantile": repr(q)}, float(v)) for q, v in zip(LATENCY_QUANTILES, qs)),
             ("_sum", {}, float(snapshot.get("latency_sum_s", float(lat.sum())))),
             ("_count", {}, int(snapshot.get("latency_count", lat.size)))])

    _family(lines, "nurec_renders_total", "counter", "Renders done (camera images and lidar sweeps).",
            [("", {}, int(snapshot.get("renders", 0)))])
    scenes = sorted(snapshot.get("scenes_loaded") or [])
    _family(lines, "nurec_scenes_loaded", "gauge", "Scenes loaded in memory.", [("", {}, len(scenes))])
    _family(lines, "nurec_scene_loaded", "gauge", "1 for each scene loaded in memory.",
            [("", {"scene_id": s}, 1) for s in scenes])
    _family(lines, "nurec_compiles_total", "counter", "XLA compilations of render functions.",
            [("", {}, int(snapshot.get("compiles", 0)))])
    cache = snapshot.get("compile_cache") or {}
    _family(lines, "nurec_compile_cache_hits_total", "counter",
            "Executables loaded from the JAX persistent compilation cache.", [("", {}, int(cache.get("hits", 0)))])
    _family(lines, "nurec_compile_cache_misses_total", "counter",
            "JAX persistent compilation cache lookups that found nothing.", [("", {}, int(cache.get("misses", 0)))])
    state = str(snapshot.get("warmup_state") or "off")
    states = WARMUP_STATES if state in WARMUP_STATES else (*WARMUP_STATES, state)
    _family(lines, "nurec_warmup_state", "gauge", "Compile warm-up state (1 for the current state).",
            [("", {"state": s}, int(s == state)) for s in states])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- HTTP server


class MetricsServer:
    """`GET /metrics` and `GET /healthz` on (host, port) from a daemon thread.

    Args:
        host: interface to bind ("127.0.0.1", "0.0.0.0", ...).
        port: TCP port; 0 picks a free one (`start()` returns it).
        snapshot_fn: called once per `/metrics` request, from the HTTP thread (make it thread-safe);
            returns the dict described in the module docstring. An exception answers 500.
    """

    def __init__(self, host: str, port: int, snapshot_fn: Callable[[], dict[str, Any]]):
        self.host = host
        self.port = port
        self._snapshot_fn = snapshot_fn
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Binds and starts serving; returns the bound port. Raises OSError if the port is taken."""
        if self._httpd is not None:
            return self.port
        snapshot_fn = self._snapshot_fn

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (BaseHTTPRequestHandler's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body = render_prometheus(snapshot_fn()).encode()
                    except Exception:  # noqa: BLE001 (a scrape must not kill the thread)
                        _LOGGER.exception("metrics snapshot failed")
                        self._send(500, b"snapshot failed\n", "text/plain; charset=utf-8")
                        return
                    self._send(200, body, CONTENT_TYPE)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                _LOGGER.debug("metrics http: " + fmt, *args)

        httpd = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="nurec-metrics-http", daemon=True)
        self._thread.start()
        _LOGGER.info("metrics endpoint: http://%s:%d/metrics", self.host, self.port)
        return self.port

    def stop(self) -> None:
        """Stops serving and closes the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# ------------------------------------------------------------------------------ compile cache counter


class CompileCacheCounter:
    """Counts JAX compilation events in this process through `jax.monitoring` listeners.

    Attributes (read any time; updated from whichever thread compiles):
        lookups: persistent-cache lookups (CACHE_LOOKUP_EVENT; 0 while the cache is off).
        hits: lookups that loaded an executable (CACHE_HIT_EVENT).
        misses: lookups that found nothing (`lookups - hits`; JAX's own "cache_misses" event counts only
            misses that were written back, see `writes`).
        writes: entries written to the cache (CACHE_WRITE_EVENT).
        backend_compiles: executables compiled or loaded from the persistent cache (BACKEND_COMPILE_EVENT).
        compiles: real XLA compilations (`backend_compiles - hits`).
        compile_seconds: total seconds of BACKEND_COMPILE_EVENT (cache loads included).

    Counts start at `register()`; use `compile_cache_counters()` for the process-wide instance.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._registered = False
        self.lookups = self.hits = self.writes = self.backend_compiles = 0
        self.compile_seconds = 0.0

    @property
    def misses(self) -> int:
        return max(self.lookups - self.hits, 0)

    @property
    def compiles(self) -> int:
        return max(self.backend_compiles - self.hits, 0)

    def _on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_LOOKUP_EVENT:
            with self._lock:
                self.lookups += 1
        elif event == CACHE_HIT_EVENT:
            with self._lock:
                self.hits += 1
        elif event == CACHE_WRITE_EVENT:
            with self._lock:
                self.writes += 1

    def _on_duration(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.backend_compiles += 1
                self.compile_seconds += duration_secs

    def register(self) -> CompileCacheCounter:
        """Adds the jax.monitoring listeners (once; idempotent)."""
        import jax.monitoring

        with self._lock:
            if not self._registered:
                jax.monitoring.register_event_listener(self._on_event)
                jax.monitoring.register_event_duration_secs_listener(self._on_duration)
                self._registered = True
        return self

    def unregister(self) -> None:
        """Removes the listeners (counts are kept)."""
        import jax.monitoring

        with self._lock:
            if self._registered:
                self._registered = False
                for fn, unreg in ((self._on_event, jax.monitoring.unregister_event_listener),
                                  (self._on_duration, jax.monitoring.unregister_event_duration_listener)):
                    try:
                        unreg(fn)
                    except (AssertionError, ValueError):  # already dropped by clear_event_listeners()
                        pass

    def snapshot(self) -> dict[str, int]:
        """{"hits", "misses", "lookups", "writes", "compiles"}: the `compile_cache` entry of a metrics
        snapshot takes "hits"/"misses"; "compiles" fits its `compiles` entry."""
        with self._lock:
            return {"hits": self.hits, "misses": max(self.lookups - self.hits, 0), "lookups": self.lookups,
                    "writes": self.writes, "compiles": max(self.backend_compiles - self.hits, 0)}


_COUNTER: CompileCacheCounter | None = None
_COUNTER_LOCK = threading.Lock()


def compile_cache_counters() -> CompileCacheCounter:
    """The process-wide `CompileCacheCounter`, registered on first call (later calls return it)."""
    global _COUNTER
    with _COUNTER_LOCK:
        if _COUNTER is None:
            _COUNTER = CompileCacheCounter().register()
        return _COUNTER
