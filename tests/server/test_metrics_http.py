"""The /metrics HTTP endpoint, its Prometheus text, and the JAX compile-cache counter
(nurec_jax/server/metrics_http.py)."""

import http.client

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache

from nurec_jax.server.metrics_http import (CompileCacheCounter, MetricsServer, compile_cache_counters,
                                           render_prometheus)

_SNAPSHOT = {
    "requests": {"render_rgb": 3, "get_version": 1},
    "status": {"OK": 3, "NOT_FOUND": 1},
    "latency_s": [0.1, 0.2, 0.3, 0.4, 0.5],
    "renders": 3,
    "scenes_loaded": ["street-b", 'we"ird\\id\nx'],
    "compiles": 2,
    "compile_cache": {"hits": 1, "misses": 2},
    "warmup_state": "running",
}

_EXPECTED = r"""# HELP nurec_requests_total gRPC requests received, by method.
# TYPE nurec_requests_total counter
nurec_requests_total{method="get_version"} 1
nurec_requests_total{method="render_rgb"} 3
# HELP nurec_responses_total gRPC responses sent, by status code.
# TYPE nurec_responses_total counter
nurec_responses_total{code="NOT_FOUND"} 1
nurec_responses_total{code="OK"} 3
# HELP nurec_render_latency_seconds Render latency in seconds (quantiles over recent renders).
# TYPE nurec_render_latency_seconds summary
nurec_render_latency_seconds{quantile="0.5"} 0.3
nurec_render_latency_seconds{quantile="0.95"} 0.48
nurec_render_latency_seconds_sum 1.5
nurec_render_latency_seconds_count 5
# HELP nurec_renders_total Renders done (camera images and lidar sweeps).
# TYPE nurec_renders_total counter
nurec_renders_total 3
# HELP nurec_scenes_loaded Scenes loaded in memory.
# TYPE nurec_scenes_loaded gauge
nurec_scenes_loaded 2
# HELP nurec_scene_loaded 1 for each scene loaded in memory.
# TYPE nurec_scene_loaded gauge
nurec_scene_loaded{scene_id="street-b"} 1
nurec_scene_loaded{scene_id="we\"ird\\id\nx"} 1
# HELP nurec_compiles_total XLA compilations of render functions.
# TYPE nurec_compiles_total counter
nurec_compiles_total 2
# HELP nurec_compile_cache_hits_total Executables loaded from the JAX persistent compilation cache.
# TYPE nurec_compile_cache_hits_total counter
nurec_compile_cache_hits_total 1
# HELP nurec_compile_cache_misses_total JAX persistent compilation cache lookups that found nothing.
# TYPE nurec_compile_cache_misses_total counter
nurec_compile_cache_misses_total 2
# HELP nurec_warmup_state Compile warm-up state (1 for the current state).
# TYPE nurec_warmup_state gauge
nurec_warmup_state{state="off"} 0
nurec_warmup_state{state="running"} 1
nurec_warmup_state{state="done"} 0
nurec_warmup_state{state="stopped"} 0
nurec_warmup_state{state="failed"} 0
"""


def test_render_prometheus_exact():
    assert render_prometheus(_SNAPSHOT) == _EXPECTED


def test_render_prometheus_empty_and_cumulative():
    text = render_prometheus({})
    lines = text.splitlines()
    assert 'nurec_render_latency_seconds{quantile="0.5"} NaN' in lines
    assert "nurec_render_latency_seconds_count 0" in lines and "nurec_renders_total 0" in lines
    assert "nurec_scenes_loaded 0" in lines and 'nurec_warmup_state{state="off"} 1' in lines
    assert not [x for x in lines if x.startswith(("nurec_requests_total", "nurec_scene_loaded"))]
    assert "# TYPE nurec_requests_total counter" in lines  # families are always exposed
    lines = render_prometheus({"latency_s": [1.0], "latency_count": 10, "latency_sum_s": 12.5,
                               "warmup_state": "odd"}).splitlines()
    assert "nurec_render_latency_seconds_count 10" in lines and "nurec_render_latency_seconds_sum 12.5" in lines
    assert 'nurec_warmup_state{state="odd"} 1' in lines and 'nurec_warmup_state{state="off"} 0' in lines


@pytest.fixture
def metrics_server():
    calls = []

    def snapshot():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("state not ready")
        return _SNAPSHOT

    server = MetricsServer("127.0.0.1", 0, snapshot)
    port = server.start()
    assert port > 0 and server.start() == port  # idempotent
    yield port
    server.stop()
    server.stop()


def _get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read().decode()
    finally:
        conn.close()


def test_metrics_server(metrics_server):
    status, ctype, body = _get(metrics_server, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4") and body == _EXPECTED
    assert _get(metrics_server, "/metrics")[0] == 500  # a failing snapshot answers 500 ...
    assert _get(metrics_server, "/metrics?x=1")[0] == 200  # ... and the server keeps serving
    assert _get(metrics_server, "/healthz")[:3:2] == (200, "ok\n")
    assert _get(metrics_server, "/nope")[0] == 404


def test_metrics_server_stops():
    server = MetricsServer("127.0.0.1", 0, dict)
    port = server.start()
    server.stop()
    with pytest.raises(OSError):
        _get(port, "/healthz")


# ------------------------------------------------------------------------------- compile cache counter


@pytest.fixture
def persistent_cache(tmp_path):
    """JAX's persistent compilation cache in tmp_path for one test, caching everything; restored after."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()  # the cache is bound to a directory on first use
    try:
        yield tmp_path / "jax-cache"
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()
        jax.clear_caches()  # drop executables loaded from the tmp cache


def test_compile_cache_counter(persistent_cache):
    counter = CompileCacheCounter().register()
    assert counter.register() is counter  # idempotent: one listener
    try:
        def f(x):
            return jnp.tanh(x) * 3.0 + 0.25

        x = jnp.ones((3,), jnp.float32)
        jax.block_until_ready(x)
        before = counter.snapshot()
        jax.jit(f)(x).block_until_ready()
        first = counter.snapshot()
        assert first["misses"] - before["misses"] == 1 and first["hits"] == before["hits"]
        assert first["writes"] - before["writes"] == 1 and first["compiles"] - before["compiles"] == 1
        assert any(persistent_cache.iterdir())

        jax.clear_caches()  # forget the in-memory executable: the next call goes to the persistent cache
        jax.jit(f)(x).block_until_ready()
        second = counter.snapshot()
        assert second["hits"] - first["hits"] == 1 and second["misses"] == first["misses"]
        assert second["compiles"] == first["compiles"]  # a cache load is not a compilation
        assert counter.backend_compiles >= 2 and counter.compile_seconds > 0
    finally:
        counter.unregister()
        counter.unregister()  # idempotent
    jax.clear_caches()
    jax.jit(lambda v: v - 1.5)(x).block_until_ready()
    assert counter.snapshot() == second  # unregistered: no more counting


def test_compile_cache_counters_singleton():
    c = compile_cache_counters()
    assert compile_cache_counters() is c and isinstance(c, CompileCacheCounter)
    assert set(c.snapshot()) == {"hits", "misses", "lookups", "writes", "compiles"}
