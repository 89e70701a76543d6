"""The /metrics endpoint (prometheus-client's exposition of what the server counts), scraped and parsed
with the library's own parser, and the JAX compile-cache counter (nurec_jax/server/metrics.py)."""

import http.client

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache
from prometheus_client.parser import text_string_to_metric_families

from nurec_jax.server.metrics import (
    LATENCY_BUCKETS,
    CompileCacheCounter,
    LatencyHistogram,
    MetricsServer,
    compile_cache_counters,
)


def _snapshot():
    latency = LatencyHistogram()
    for s in (0.004, 0.2, 0.3, 0.7, 12.0):
        latency.observe(s)
    return {
        "requests": {"render_rgb": 6, "get_version": 1},
        "responses": {("render_rgb", "OK"): 5, ("render_rgb", "NOT_FOUND"): 1, ("get_version", "OK"): 1},
        "latency_histogram": latency.collect(),
        "renders": 5,
        "scenes_loaded": ["street-b", 'we"ird\\id\nx'],
        "compiles": 2,
        "compile_cache": {"hits": 1, "misses": 2},
        "warmup_state": "running",
    }


def _families(text: str) -> dict:
    """{family name: {(sample name, sorted labels): value}} from an exposition, via prometheus-client's parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = (fam.type, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples})
    return out


@pytest.fixture
def metrics_server():
    calls = []

    def snapshot():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("state not ready")
        return _snapshot()

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


def test_scrape_has_every_family_and_label(metrics_server):
    status, ctype, body = _get(metrics_server, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=")
    fams = _families(body)
    assert fams["nurec_requests"] == (
        "counter",
        {
            ("nurec_requests_total", (("method", "get_version"),)): 1.0,
            ("nurec_requests_total", (("method", "render_rgb"),)): 6.0,
        },
    )
    kind, samples = fams["nurec_responses"]
    assert kind == "counter" and samples == {
        ("nurec_responses_total", (("code", "NOT_FOUND"), ("method", "render_rgb"))): 1.0,
        ("nurec_responses_total", (("code", "OK"), ("method", "get_version"))): 1.0,
        ("nurec_responses_total", (("code", "OK"), ("method", "render_rgb"))): 5.0,
    }
    kind, samples = fams["nurec_render_latency_seconds"]
    assert kind == "histogram"
    buckets = {dict(labels)["le"]: v for (name, labels), v in samples.items() if name.endswith("_bucket")}
    assert len(buckets) == len(LATENCY_BUCKETS)  # the standard buckets, +Inf among them
    assert buckets["0.005"] == 1 and buckets["0.25"] == 2 and buckets["0.75"] == 4 and buckets["10.0"] == 4
    assert buckets["+Inf"] == 5
    assert samples[("nurec_render_latency_seconds_count", ())] == 5
    assert samples[("nurec_render_latency_seconds_sum", ())] == pytest.approx(13.204)
    assert fams["nurec_renders"] == ("counter", {("nurec_renders_total", ()): 5.0})
    assert fams["nurec_scenes_loaded"] == ("gauge", {("nurec_scenes_loaded", ()): 2.0})
    assert fams["nurec_scene_loaded"][1] == {
        ("nurec_scene_loaded", (("scene_id", "street-b"),)): 1.0,
        ("nurec_scene_loaded", (("scene_id", 'we"ird\\id\nx'),)): 1.0,
    }
    assert fams["nurec_compiles"] == ("counter", {("nurec_compiles_total", ()): 2.0})
    assert fams["nurec_compile_cache_hits"][1] == {("nurec_compile_cache_hits_total", ()): 1.0}
    assert fams["nurec_compile_cache_misses"][1] == {("nurec_compile_cache_misses_total", ()): 2.0}
    kind, samples = fams["nurec_warmup_state"]
    assert kind == "gauge" and {dict(k[1])["state"]: v for k, v in samples.items()} == {
        "off": 0,
        "running": 1,
        "done": 0,
        "stopped": 0,
        "failed": 0,
    }


def test_failing_snapshot_answers_500_and_the_endpoint_keeps_serving(metrics_server):
    assert _get(metrics_server, "/metrics")[0] == 200
    assert _get(metrics_server, "/metrics")[0] == 500  # the second snapshot raises ...
    assert _get(metrics_server, "/metrics?x=1")[0] == 200  # ... and the server keeps serving
    assert _get(metrics_server, "/healthz")[:3:2] == (200, "ok\n")
    assert _get(metrics_server, "/nope")[0] == 404


def test_empty_snapshot_exposes_every_family():
    server = MetricsServer("127.0.0.1", 0, dict)
    port = server.start()
    try:
        fams = _families(_get(port, "/metrics")[2])
    finally:
        server.stop()
    assert {
        "nurec_requests",
        "nurec_responses",
        "nurec_render_latency_seconds",
        "nurec_renders",
        "nurec_scenes_loaded",
        "nurec_scene_loaded",
        "nurec_compiles",
        "nurec_compile_cache_hits",
        "nurec_compile_cache_misses",
        "nurec_warmup_state",
    } <= set(fams)
    assert fams["nurec_render_latency_seconds"][1][("nurec_render_latency_seconds_count", ())] == 0
    with pytest.raises(OSError):
        _get(port, "/healthz")


# ------------------------------------------------------------------------------- compile cache counter


@pytest.fixture
def persistent_cache(tmp_path):
    """JAX's persistent compilation cache in tmp_path for one test, caching everything; restored after."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
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
