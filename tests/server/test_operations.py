"""Server operations on a real server: per-stage timing (log lines, logfile, summary in get_server_config),
metrics.yaml, the /metrics HTTP view, the JAX profiler trace, and the --enable-difix post-processing hook."""

from __future__ import annotations

import glob
import json
import os
import urllib.request

import numpy as np
import pytest
import yaml
from grpc_helpers import connect, decode, rgb_request
from prometheus_client.parser import text_string_to_metric_families

from nurec_jax import load_scene, read_scene_metadata
from nurec_jax._proto import common_pb2
from nurec_jax.render import RenderOptions
from nurec_jax.renderer import Renderer
from nurec_jax.server import images
from nurec_jax.server import requests as req_lib
from nurec_jax.server.app import create_server
from nurec_jax.server.options import ServerOptions
from tools.make_postprocess_model import make_model

pytestmark = pytest.mark.xdist_group("grpc")

SID = "thin-street"


def test_timing_metrics_profiler_and_postprocessing(thin_scene, tmp_path):
    model = make_model("warm")
    (tmp_path / "difix").mkdir()
    model.save(str(tmp_path / "difix" / "grade.msgpack"))
    renderer = Renderer(RenderOptions(pair_capacity=1 << 16))
    opts = ServerOptions(
        artifact_glob=thin_scene,
        port=0,
        enable_timing=True,
        timing_verbosity="BASIC",
        timing_logfile=str(tmp_path / "timing" / "log.jsonl"),
        timing_synchronize=True,
        metrics_output_dir=str(tmp_path / "metrics"),
        metrics_port=0,
        profiling_backend="JAX",
        profiling_trace_dir=str(tmp_path / "trace"),
        enable_difix=True,
        difix_cache=str(tmp_path / "difix"),
        difix_model_filename="grade.msgpack",
        difix_resolution=(0, 0),
    )
    srv, port = create_server("127.0.0.1:0", opts, renderer=renderer)
    try:
        assert srv.serving.wait(30)
        channel, stub = connect(port)
        req = rgb_request(thin_scene, SID, frame=10)
        served = [decode(stub.render_rgb(req).image_bytes) for _ in range(4)]
        # The post-pass is applied to the render: the served image is the model applied to the library's image.
        scene, meta = load_scene(thin_scene), read_scene_metadata(thin_scene)
        job = req_lib.prepare_rgb(meta, req, editing_enabled=False)
        out = renderer.render(
            scene.gaussians, job.camera, job.sensor_pose, req_lib.job_actor_poses(meta, scene.gaussians.track_ids, job)
        )
        plain = np.asarray(out.rgb)
        expected = images.to_uint8(model(plain))
        assert np.abs(served[0].astype(int) - expected.astype(int)).max() <= 1
        assert np.abs(served[0].astype(int) - images.to_uint8(plain).astype(int)).mean() > 3  # it did something
        # Timing summary in get_server_config; health counters; the /metrics view.
        cfg = stub.get_server_config(common_pb2.Empty()).server_config
        for stage in ("decode_request", "setup", "render", "postprocess", "encode", "total"):
            assert float(cfg[f"timing.render_rgb.{stage}.p50_ms"]) >= 0.0, stage
        assert float(cfg["timing.render_rgb.render.p50_ms"]) > 0.1
        assert "render_rgb': 4" in cfg["stats.requests"] and int(cfg["stats.compile_cache_hits"]) >= 0
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }
        assert samples[("nurec_requests_total", (("method", "render_rgb"),))] == 4
        assert samples[("nurec_responses_total", (("code", "OK"), ("method", "render_rgb")))] == 4
        assert samples[("nurec_scene_loaded", (("scene_id", SID),))] == 1
        assert samples[("nurec_render_latency_seconds_count", ())] == 4
        channel.close()
    finally:
        srv.stop(5)
    # Per-request JSON lines, metrics.yaml (3 warm-up renders skipped), a profiler trace with stage ranges.
    with open(tmp_path / "timing" / "log.jsonl") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    per_request = [line for line in lines if line.get("method") == "render_rgb"]
    assert len(per_request) == 4 and set(per_request[0]["stages"]) >= {"render", "postprocess", "encode"}
    metrics = yaml.safe_load(open(tmp_path / "metrics" / "metrics.yaml"))
    assert metrics["render_rgb"]["count"] == 1 and metrics["render_rgb"]["warmup_skipped"] == 3
    traces = glob.glob(str(tmp_path / "trace" / "**" / "*.xplane.pb"), recursive=True)
    assert traces and b"postprocess" in open(traces[0], "rb").read()
    assert os.path.getsize(traces[0]) > 0
