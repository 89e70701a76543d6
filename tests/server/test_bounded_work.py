"""Bounded work for valid requests: the output-size limit (checked before anything compiles), the
bounded cache of compiled variants over a run that keeps changing sizes, and calls whose deadline
passes or whose client leaves while their render compiles are stopped before they run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_helpers import HEIGHT, connect, decode, rgb_request, rpc_error, wait_for_idle_render_workers

from nurec_jax import renderer as RR
from nurec_jax._proto import common_pb2, sensorsim_pb2
from nurec_jax.server.app import create_server
from nurec_jax.server.options import ServerOptions

pytestmark = pytest.mark.xdist_group("grpc")

SID = "thin-street"
E = common_pb2.Empty()
LIMIT = 4000  # pixels: 64x36 (2304) renders, 106x60 (6360) does not


@pytest.fixture(scope="module")
def server(thin_scene, tmp_path_factory):
    before = RR.COMPILED.max_entries
    opts = ServerOptions(
        artifact_glob=thin_scene,
        port=0,
        max_workers=2,
        max_compiled_variants=2,
        max_output_pixels=LIMIT,
        download_cache_dir=str(tmp_path_factory.mktemp("dl")),
    )
    srv, port = create_server("127.0.0.1:0", opts)
    assert srv.serving.wait(30)
    channel, stub = connect(port)
    yield srv, stub
    channel.close()
    srv.stop(1)
    RR.COMPILED.resize(before)  # process-wide: later tests in this worker get the usual bound back


def _config(stub) -> dict:
    return dict(stub.get_server_config(E).server_config)


def _good(stub, thin_scene):
    assert decode(stub.render_rgb(rgb_request(thin_scene, SID), timeout=120).image_bytes).shape == (HEIGHT, 64, 3)


def test_output_size_is_bounded_before_anything_compiles(server, thin_scene):
    srv, stub = server
    _good(stub, thin_scene)
    traces = srv.renderer.trace_count
    wide = rgb_request(thin_scene, SID)
    wide.resolution_w, wide.resolution_h = 5000, 1  # NuRec's rule: 5000x2812 for a 16:9 camera
    code, details = rpc_error(stub.render_rgb, wide, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "resolution_w/resolution_h: 5000x1 gives an output of 5000x2812" in details and str(LIMIT) in details
    code, details = rpc_error(stub.render_rgb, rgb_request(thin_scene, SID, height=60), timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "106x60" in details and "--max-output-pixels" in details
    batch = sensorsim_pb2.BatchRGBRenderRequest(
        items=[
            sensorsim_pb2.BatchRGBRenderRequestItem(request=wide, camera_name="big"),
            sensorsim_pb2.BatchRGBRenderRequestItem(request=rgb_request(thin_scene, SID), camera_name="ok"),
        ]
    )
    items = stub.batch_render_rgb(batch, timeout=120).items
    assert not items[0].success and items[0].error_message.startswith(
        "INVALID_ARGUMENT: items[0].request.resolution_w/resolution_h: 5000x1"
    )
    assert items[1].success
    assert srv.renderer.trace_count == traces  # nothing was compiled for the refused sizes
    _good(stub, thin_scene)
    config = _config(stub)
    assert config["max_output_pixels"] == str(LIMIT) and config["max_compiled_variants"] == "2"


def test_compiled_variants_stay_bounded_over_many_sizes(server, thin_scene):
    srv, stub = server
    start = _config(stub)
    evictions0, traces0 = int(start["stats.compiled_variant_evictions"]), srv.renderer.trace_count
    heights = [8, 10, 12]  # three sizes with room for two (retracing after an eviction: test_compiled_cache.py)
    for h in heights:
        img = decode(stub.render_rgb(rgb_request(thin_scene, SID, height=h), timeout=120).image_bytes)
        assert img.shape[0] == h
        config = _config(stub)
        assert int(config["stats.compiled_variants"]) <= 2
    assert int(config["stats.compiled_variant_evictions"]) >= evictions0 + 1
    assert srv.renderer.trace_count >= traces0 + 3
    assert int(config["stats.compiles"]) >= srv.renderer.trace_count
    _good(stub, thin_scene)


@pytest.fixture
def slow_compiles(monkeypatch):
    """Makes every executable lookup take `delay` s more (a long compile); `entered` is set on the first."""
    state = {"delay": 1.5, "entered": threading.Event(), "calls": 0}
    original = RR.COMPILED.get

    def slow_get(*args, **kwargs):
        exe = original(*args, **kwargs)
        state["calls"] += 1
        state["entered"].set()
        time.sleep(state["delay"])  # the behaviour under test: a compile that outlasts the call
        return exe

    monkeypatch.setattr(RR.COMPILED, "get", slow_get)
    return state


def test_a_call_that_expires_or_leaves_while_compiling_is_not_run(server, thin_scene, slow_compiles):
    srv, stub = server
    _good(stub, thin_scene)  # compiled at HEIGHT; the patch below only delays the lookup
    stats = srv.servicer.stats
    renders, skipped = stats.renders, stats.skipped_cancelled
    code, _ = rpc_error(stub.render_rgb, rgb_request(thin_scene, SID), timeout=0.7)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_idle_render_workers(srv.servicer)  # the call's worker has finished its "compile"
    assert stats.skipped_cancelled == skipped + 1
    # The client goes away while its render "compiles".
    slow_compiles["entered"].clear()
    fut = stub.render_rgb.future(rgb_request(thin_scene, SID), timeout=60)
    assert slow_compiles["entered"].wait(30)
    fut.cancel()
    wait_for_idle_render_workers(srv.servicer)
    assert stats.skipped_cancelled == skipped + 2
    # A batch whose deadline passes during its first item does not go on to the second.
    calls = slow_compiles["calls"]
    batch = sensorsim_pb2.BatchRGBRenderRequest(
        items=[
            sensorsim_pb2.BatchRGBRenderRequestItem(request=rgb_request(thin_scene, SID, frame=f), camera_name=str(f))
            for f in (10, 20)
        ]
    )
    code, _ = rpc_error(stub.batch_render_rgb, batch, timeout=0.7)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_idle_render_workers(srv.servicer)  # the batch's worker is done: it will not start another item
    assert stats.skipped_cancelled == skipped + 3
    assert slow_compiles["calls"] == calls + 1  # the second item never reached the device
    assert stats.renders == renders  # none of the three ran
    slow_compiles["delay"] = 0.0
    _good(stub, thin_scene)
    assert stats.renders == renders + 1


def test_serve_grpc_refuses_a_zero_bound_in_one_line():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nurec_jax.cli.serve_grpc",
            "--port=0",
            "--compilation-cache-dir=",
            "--max-compiled-variants=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--max-compiled-variants must be >= 1, got 0" in proc.stderr and "Traceback" not in proc.stderr
