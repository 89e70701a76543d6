"""What the server counts, in Prometheus form: `GET /metrics` and `GET /healthz` on `--metrics-port`.

The exposition, the metric types and the HTTP endpoint are prometheus-client's (the library the field
and AlpaSim's runtime use); this module only says what to expose. The server's own state is read at
scrape time from `snapshot_fn()` (`SensorsimServicer.snapshot`), a dict with

    requests            {method: int}              RPCs received per gRPC method
    responses           {(method, code): int}      RPCs answered per method and grpc.StatusCode name
    latency_histogram   [MetricFamily]             `LatencyHistogram.collect()`: successful renders only
    renders             int                        camera images and lidar spins rendered
    scenes_loaded       [scene_id]                 scenes resident on the device
    compiles            int                        render / lidar functions traced
    compile_cache       {"hits": int, "misses": int}   JAX persistent compilation cache lookups
    warmup_state        str                        off | running | done | stopped | failed

Missing keys read as zero or empty, so every family is always exposed. Each server has its own
`CollectorRegistry`, so several servers in one process (tests) never share counters.

`CompileCacheCounter` counts JAX compilation events in-process (through `jax.monitoring`), for the
compile families above and `get_server_config`.
"""

from __future__ import annotations

import logging
import threading
import wsgiref.simple_server
from socketserver import ThreadingMixIn
from typing import Any, Callable

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LOGGER = logging.getLogger(__name__)

# prometheus-client's standard latency buckets (5 ms .. 10 s, then +Inf).
LATENCY_BUCKETS = prometheus_client.Histogram.DEFAULT_BUCKETS
WARMUP_STATES = ("off", "running", "done", "stopped", "failed")  # nurec_jax.server.warmup.WarmupStatus
RENDER_METHODS = ("render_rgb", "batch_render_rgb", "render_aggregated")

# JAX monitoring events (jax 0.11.2: jax/_src/compiler.py, compilation_cache.py, dispatch.py).
CACHE_LOOKUP_EVENT = "/jax/compilation_cache/compile_requests_use_cache"  # a persistent-cache lookup
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # the lookup found an executable
# Named "misses" by JAX but recorded only when an entry is *written* (a miss whose compile took at least
# jax_persistent_cache_min_compile_time_secs and whose entry is at least ..._min_entry_size_bytes).
CACHE_WRITE_EVENT = "/jax/compilation_cache/cache_misses"
# A duration event around every compile-or-load of an executable (the in-memory cache missed); it
# includes executables loaded from the persistent cache.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class LatencyHistogram:
    """All-time histogram of successful render latencies (prometheus-client's `Histogram`, registered
    nowhere: the server's collector exposes it). Thread-safe."""

    NAME = "nurec_render_latency_seconds"

    def __init__(self):
        self._histogram = prometheus_client.Histogram(
            self.NAME,
            "Latency of successful render RPCs in seconds (refused calls are not counted).",
            buckets=LATENCY_BUCKETS,
            registry=None,
        )

    def observe(self, seconds: float) -> None:
        self._histogram.observe(seconds)

    def collect(self) -> list:
        return list(self._histogram.collect())


class ServerCollector:
    """A prometheus-client collector that reads `snapshot_fn()` once per scrape."""

    def __init__(self, snapshot_fn: Callable[[], dict[str, Any]]):
        self._snapshot_fn = snapshot_fn

    def describe(self):
        return []  # families are built per scrape; registering must not call snapshot_fn

    def collect(self):
        snap = self._snapshot_fn()
        requests = CounterMetricFamily("nurec_requests", "gRPC requests received, by method.", labels=["method"])
        for method, n in sorted((snap.get("requests") or {}).items()):
            requests.add_metric([method], n)
        yield requests
        responses = CounterMetricFamily(
            "nurec_responses", "gRPC responses sent, by method and status code.", labels=["method", "code"]
        )
        for (method, code), n in sorted((snap.get("responses") or {}).items()):
            responses.add_metric([method, code], n)
        yield responses
        histogram = snap.get("latency_histogram")
        yield from histogram if histogram is not None else LatencyHistogram().collect()
        yield CounterMetricFamily(
            "nurec_renders", "Renders done (camera images and lidar spins).", value=int(snap.get("renders", 0))
        )
        scenes = sorted(snap.get("scenes_loaded") or [])
        yield GaugeMetricFamily("nurec_scenes_loaded", "Scenes resident on the device.", value=len(scenes))
        each = GaugeMetricFamily("nurec_scene_loaded", "1 for each scene resident on the device.", labels=["scene_id"])
        for sid in scenes:
            each.add_metric([sid], 1)
        yield each
        yield CounterMetricFamily(
            "nurec_compiles", "Render and lidar functions traced for compilation.", value=int(snap.get("compiles", 0))
        )
        cache = snap.get("compile_cache") or {}
        yield CounterMetricFamily(
            "nurec_compile_cache_hits",
            "Executables loaded from the JAX persistent compilation cache.",
            value=int(cache.get("hits", 0)),
        )
        yield CounterMetricFamily(
            "nurec_compile_cache_misses",
            "JAX persistent compilation cache lookups that found nothing.",
            value=int(cache.get("misses", 0)),
        )
        state = str(snap.get("warmup_state") or "off")
        warmup = GaugeMetricFamily(
            "nurec_warmup_state", "Compile warm-up state (1 for the current state).", labels=["state"]
        )
        for s in WARMUP_STATES if state in WARMUP_STATES else (*WARMUP_STATES, state):
            warmup.add_metric([s], int(s == state))
        yield warmup


def registry_for(snapshot_fn: Callable[[], dict[str, Any]]) -> prometheus_client.CollectorRegistry:
    """A registry of its own holding the server's collector."""
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(snapshot_fn))
    return registry


# ---------------------------------------------------------------------------------------- HTTP server


class _ThreadingWSGIServer(ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, fmt, *args):  # scrapes every few seconds must not flood the log
        _LOGGER.debug("metrics http: " + fmt, *args)


def wsgi_app(registry: prometheus_client.CollectorRegistry):
    """`/metrics` (prometheus-client's exposition of `registry`), `/healthz` (ok), 404 otherwise."""
    metrics = prometheus_client.make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found\n"]

    return app


class MetricsServer:
    """Serves `wsgi_app(registry_for(snapshot_fn))` on (host, port) from a daemon thread.

    Args:
      host: interface to bind ("127.0.0.1", "0.0.0.0", ...).
      port: TCP port; 0 picks a free one (`start()` returns it).
      snapshot_fn: called once per scrape from the HTTP thread (must be thread-safe).
    """

    def __init__(self, host: str, port: int, snapshot_fn: Callable[[], dict[str, Any]]):
        self.host = host
        self.port = port
        self.registry = registry_for(snapshot_fn)
        self._httpd: _ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Binds and starts serving; returns the bound port. Raises OSError if the port is taken."""
        if self._httpd is not None:
            return self.port
        httpd = wsgiref.simple_server.make_server(
            self.host,
            self.port,
            wsgi_app(self.registry),
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="nurec-metrics-http", daemon=True
        )
        self._thread.start()
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
                for fn, unreg in (
                    (self._on_event, jax.monitoring.unregister_event_listener),
                    (self._on_duration, jax.monitoring.unregister_event_duration_listener),
                ):
                    try:
                        unreg(fn)
                    except (AssertionError, ValueError):  # already dropped by clear_event_listeners()
                        pass

    def snapshot(self) -> dict[str, int]:
        """{"hits", "misses", "lookups", "writes", "compiles"}: the `compile_cache` entry of a metrics
        snapshot takes "hits"/"misses"; "compiles" fits its `compiles` entry."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": max(self.lookups - self.hits, 0),
                "lookups": self.lookups,
                "writes": self.writes,
                "compiles": max(self.backend_compiles - self.hits, 0),
            }


_COUNTER: CompileCacheCounter | None = None
_COUNTER_LOCK = threading.Lock()


def compile_cache_counters() -> CompileCacheCounter:
    """The process-wide `CompileCacheCounter`, registered on first call (later calls return it)."""
    global _COUNTER
    with _COUNTER_LOCK:
        if _COUNTER is None:
            _COUNTER = CompileCacheCounter().register()
        return _COUNTER
