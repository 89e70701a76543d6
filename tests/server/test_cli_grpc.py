"""serve-grpc and render-grpc as users run them: separate processes, NuRec's flag spelling."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from PIL import Image
from thin_scene import write_thin_scene

pytestmark = pytest.mark.xdist_group("grpc")

CAM = "camera_front_wide_120fov"


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _start_server(*args):
    if not any(a.startswith("--compilation-cache-dir") for a in args):
        args = args + ("--compilation-cache-dir=",)  # tests never write to the user's cache
    proc = subprocess.Popen([sys.executable, "-m", "nurec_jax.cli.serve_grpc", "--host=127.0.0.1", "--port=0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    found = {}

    def read():
        for line in proc.stdout:
            m = re.search(r"listening on [\d.]+:(\d+)", line)
            if m:
                found["port"] = int(m.group(1))
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(120)
    if "port" not in found:
        proc.kill()
        raise AssertionError(f"serve-grpc did not start: {proc.stderr.read()[-3000:]}")
    return proc, found["port"]


def test_unavailable_features_and_bad_flags_are_refused(thin_scene, tmp_path):
    for flags, text in (((f"--enable-difix", f"--difix-cache={tmp_path}"), "no post-processing model found"),
                        (("--profiling-backend=TRACY",), "Tracy"),
                        (("--enable-harmonizer",), "--enable-harmonizer"),
                        (("--cache-size=0",), "--cache-size must be >= 1")):
        proc = subprocess.run([sys.executable, "-m", "nurec_jax.cli.serve_grpc", f"--artifact-glob={thin_scene}",
                               "--port=0", "--compilation-cache-dir=", *flags], capture_output=True, text=True,
                              timeout=120, env=_env())
        assert proc.returncode == 2 and text in proc.stderr, (flags, proc.stderr[-2000:])
    proc = subprocess.run([sys.executable, "-m", "nurec_jax.cli.serve_grpc", "--artifact-glob=/data/*.ply"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2 and "must end in .usdz" in proc.stderr


def test_sigterm_shuts_down_gracefully(thin_scene):
    proc, _ = _start_server(f"--artifact-glob={thin_scene}", "--no-enable-nrend", "--max-workers", "4",
                            "--difix-resolution", "288", "512")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "shutting down gracefully" in err


def test_render_grpc_against_serve_grpc(thin_scene, tmp_path):
    cache = tmp_path / "jax-cache"
    server, port = _start_server(f"--artifact-glob={thin_scene}", "--test-scenes-are-valid", "--no-warmup-compiles",
                                 "--enable-editing-actors", f"--compilation-cache-dir={cache}")
    out = tmp_path / "out"
    base = [sys.executable, "-m", "nurec_jax.cli.render_grpc", f"--artifact-path={thin_scene}",
            f"--output-dir={out}", f"--port={port}", "--host=127.0.0.1", "--height=24", f"--camera-id={CAM}"]
    try:
        bad = subprocess.run(base + ['--edit-assets={"replace": [{"original_id": "99", "replacement_id": "box_truck"}]}'],
                             capture_output=True, text=True, timeout=300, env=_env())
        assert bad.returncode == 1 and "Failed to edit assets: replace[0].original_id" in bad.stderr, bad.stderr[-2000:]
        # A scene the server does not serve: the client never asks it to read a local path (refused).
        other = write_thin_scene(tmp_path / "other.usdz", keep_every=200, scene_id="not-served")
        bad = subprocess.run([a if not a.startswith("--artifact-path") else f"--artifact-path={other}" for a in base],
                             capture_output=True, text=True, timeout=300, env=_env())
        assert bad.returncode == 1 and "does not serve scene 'not-served'" in bad.stderr, bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr
        bad = subprocess.run(base + ["--edit-assets={replace: 3}"], capture_output=True, text=True, timeout=300,
                             env=_env())
        assert bad.returncode == 1 and "--edit-assets: not an EditAssetsRequest" in bad.stderr, bad.stderr[-2000:]
        edit = '{"replace": [{"original_id": "3", "replacement_id": "sedan_orange"}]}'
        proc = subprocess.run(
            base + ["--frame-step=50", "--image-format=png", "--demo-actor-transform", "--shutdown-server-on-completion",
                    "--lidar", "--lidar-type=AT128", "--lidar-frame-step=200", f"--edit-assets={edit}"],
            capture_output=True, text=True, timeout=300, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "edit_assets: Success (1 replaced" in proc.stdout and "edits undone" in proc.stdout
        _, err = server.communicate(timeout=60)
        assert server.returncode == 0, err[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
    files = sorted((out / CAM).iterdir())
    assert len(files) == 3  # 120 recorded frames, every 50th
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size == (42, 24)
    with Image.open(out / f"{CAM}.gif") as gif:
        assert gif.n_frames == 3
    stamps = json.loads((out / "timestamps.json").read_text())
    assert [s["file"] for s in stamps[CAM]] == [f.name for f in files]
    assert json.loads((out / "render_grpc_cli_args.json").read_text())["height"] == 24
    assert "server shut down" in proc.stdout
    assert any(cache.iterdir())  # the render functions went to the persistent compilation cache
    from nurec_jax.pointcloud import read_ply_points

    plys = sorted((out / "lidar_top_360fov").glob("*.ply"))
    assert len(plys) == 1 and (out / "lidar_top_360fov" / (plys[0].stem + "_bev.png")).exists()
    cloud = read_ply_points(str(plys[0]))
    assert len(cloud["x"]) > 10000 and set(cloud) == {"x", "y", "z", "intensity", "ring"}
