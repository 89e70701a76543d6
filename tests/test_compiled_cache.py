"""The process-wide cache of compiled render / lidar functions (`nurec_jax.renderer.CompiledCache`):
bounded LRU, evicted executables freed, one compile per signature across threads and Renderers, and the
`check` hook that stops a frame after a compile and between its stages."""

from __future__ import annotations

import gc
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
import render_fixtures as fx
from jax.extend import backend

from nurec_jax import render as R
from nurec_jax import renderer as RR
from nurec_jax.server import requests as req_lib
from nurec_jax.server.options import ServerOptions


def _scale(x, *, k):
    return x * k


def _cache(n=2):
    # clear_jax_caches=False: the executables must be freed by dropping them alone.
    return RR.CompiledCache(n, clear_jax_caches=False)


def test_lru_bound_evictions_and_retrace_counts():
    cache, traces = _cache(2), [0]
    sizes = [1, 2, 3, 4, 5]
    for _ in range(2):
        for n in sizes:
            out = cache.call("scale", _scale, traces, (jnp.ones(n),), static=dict(k=2.0))
            np.testing.assert_allclose(np.asarray(out), 2.0)
            assert len(cache) <= 2
    st = cache.stats()
    assert (st["entries"], st["misses"], st["evictions"], st["hits"]) == (2, 10, 8, 0)
    assert traces[0] == 10  # every miss traced once
    cache.call("scale", _scale, traces, (jnp.ones(5),), static=dict(k=2.0))  # the most recent: a hit
    assert traces[0] == 10 and cache.stats()["hits"] == 1


def test_key_holds_static_values_dtypes_and_structure():
    cache, traces = _cache(8), [0]
    cache.call("scale", _scale, traces, (jnp.ones(3),), static=dict(k=2.0))
    cache.call("scale", _scale, traces, (jnp.ones(3),), static=dict(k=2.0))
    assert traces[0] == 1
    cache.call("scale", _scale, traces, (jnp.ones(3),), static=dict(k=3.0))
    cache.call("scale", _scale, traces, (jnp.ones(3, jnp.int32),), static=dict(k=2))
    cache.call("scale", _scale, traces, (jnp.ones(3),), dict(), static=dict(k=2.0))  # same as the first
    cache.call("sum", lambda x, y: x + y, traces, (jnp.ones(3),), dict(y=jnp.ones(3)))  # kwargs in the structure
    assert traces[0] == 4 and len(cache) == 4


def _live_programs() -> list[str]:
    """The HLO text of every executable alive on the default backend (what `Compiled.as_text()` gives)."""
    return [e.hlo_modules()[0].to_string() for e in backend.get_backend().live_executables()]


def test_evicted_executable_is_freed():
    cache, traces = _cache(1), [0]
    exe = cache.get("scale", _scale, traces, (jnp.ones(7),), static=dict(k=2.0))
    program = exe.as_text()  # names this executable: its source lines and f32[7] shapes
    del exe
    gc.collect()
    assert program in _live_programs()  # held by the cache
    cache.call("scale", _scale, traces, (jnp.ones(8),), static=dict(k=2.0))  # evicts the first
    gc.collect()
    assert program not in _live_programs(), "an evicted executable is still referenced (by jit's own caches?)"


def test_resize_and_clear():
    cache, traces = _cache(4), [0]
    for n in range(1, 5):
        cache.call("scale", _scale, traces, (jnp.ones(n),), static=dict(k=1.0))
    cache.resize(1)
    assert len(cache) == 1 and cache.stats()["evictions"] == 3
    cache.call("scale", _scale, traces, (jnp.ones(4),), static=dict(k=1.0))  # the survivor is the newest
    assert traces[0] == 4
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_entries must be >= 1"):
        cache.resize(0)


def test_concurrent_misses_compile_once():
    cache, traces = _cache(4), [0]

    def slow(x):
        time.sleep(0.3)  # the behaviour under test: a slow trace, during which the other threads arrive
        return x + 1

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.call("slow", slow, traces, (jnp.ones(2),))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and traces[0] == 1


def test_a_failed_compile_is_not_kept():
    cache, traces, state = _cache(4), [0], {"fail": True}

    def flaky(x):
        if state["fail"]:
            raise RuntimeError("boom")
        return x

    with pytest.raises(RuntimeError, match="boom"):
        cache.call("flaky", flaky, traces, (jnp.ones(2),))
    state["fail"] = False
    assert np.asarray(cache.call("flaky", flaky, traces, (jnp.ones(2),))).tolist() == [1.0, 1.0]
    assert len(cache) == 1


def test_renderers_share_executables_and_check_stops_the_frame():
    cam = fx.square_pinhole(size=32)  # test_render_analytic's staged frame: the persistent cache has its programs
    rng = np.random.default_rng(1)
    n = 40
    means = np.stack([rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), rng.uniform(3, 6, n)], -1)
    scene = fx.analytic_scene(means, rng.uniform(0.1, 0.4, (n, 3)), rng.uniform(0.3, 0.9, n))
    opts = R.RenderOptions(pair_capacity=1 << 10, chunk=8, tile_batch=4)
    a, b = RR.Renderer(opts), RR.Renderer(opts)
    assert a.compiled_cache is RR.COMPILED is b.compiled_cache
    first = a.render(scene, cam, fx.identity_pose())
    traces = a.trace_count
    second = b.render(scene, cam, fx.identity_pose())  # another instance: no new compile
    assert b.trace_count == traces
    np.testing.assert_array_equal(np.asarray(first.rgb), np.asarray(second.rgb))

    class Stop(Exception):
        pass

    def stop_at(k):
        calls = [0]

        def check():
            calls[0] += 1
            if calls[0] >= k:
                raise Stop

        return check

    with pytest.raises(Stop):  # checked before the (compiled) frame runs
        a.render(scene, cam, fx.identity_pose(), check=stop_at(1))
    timer = RR.RecordingTimer()
    with pytest.raises(Stop):  # the staged path stops between stages
        a.render(scene, cam, fx.identity_pose(), timer=timer, check=stop_at(3))
    assert list(timer.ms) == ["projection", "binning"]


def test_output_pixel_limit_defaults_agree_and_name_the_fields():
    assert req_lib.DEFAULT_MAX_OUTPUT_PIXELS == ServerOptions().max_output_pixels
    assert ServerOptions().max_output_pixels >= 3848 * 2168  # the largest real NuRec camera fits
    req_lib.check_output_pixels(3848, 2168, 3848, 2168, (3848, 2168))
    from nurec_jax.server.request_errors import InvalidArgument

    with pytest.raises(
        InvalidArgument,
        match=r"items\[2\]\.request\.resolution_w/resolution_h: 5000x1 gives an "
        r"output of 5000x2812 .* at most 12582912 pixels",
    ):
        req_lib.check_output_pixels(5000, 2812, 5000, 1, (1920, 1080), "items[2].request.")
    for kw, flag in (
        (dict(max_output_pixels=0), "--max-output-pixels"),
        (dict(max_compiled_variants=0), "--max-compiled-variants"),
    ):
        with pytest.raises(ValueError, match=flag):
            ServerOptions(**kw).validate()


def test_pair_buckets_remember_a_bounded_number_of_sizes():
    b = RR._Buckets(1 << 20, "frame", max_keys=3)
    for i in range(5):
        b.keep(("s", i), 64)
    assert b.get(("s", 0)) is None and b.get(("s", 4)) == 64
    b.get(("s", 2))  # used: kept over ("s", 3)
    b.grow(("s", 9), 64, 100)
    assert b.get(("s", 2)) == 64 and b.get(("s", 3)) is None and b.get(("s", 9)) == 128
