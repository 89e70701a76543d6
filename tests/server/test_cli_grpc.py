"""serve-grpc and render-grpc as users run them: separate processes, NuRec's flag spelling."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageSequence

from tools.serve_process import serve_grpc_env, start_serve_grpc
from tools.thin_scene import write_thin_scene

pytestmark = pytest.mark.xdist_group("grpc")

CAM = "camera_front_wide_120fov"
TLS = pathlib.Path(__file__).resolve().parent.parent / "data" / "tls"
PROBE_NOISE = "Unable to initialize backend"  # JAX's INFO line for each platform it probes and lacks


def _env(jax_platforms="cpu"):
    return serve_grpc_env(jax_platforms)


def _start_server(*args, env=None):
    if not any(a.startswith("--compilation-cache-dir") for a in args):
        args = args + ("--compilation-cache-dir=",)  # tests never write to the user's cache
    return start_serve_grpc(*args, env=env or _env())


def test_unavailable_features_and_bad_flags_are_refused(thin_scene, tmp_path):
    for flags, text in (
        (("--enable-difix", f"--difix-cache={tmp_path}"), "no post-processing model found"),
        (("--profiling-backend=TRACY",), "Tracy"),
        (("--enable-harmonizer",), "--enable-harmonizer"),
        (("--cache-size=0",), "--cache-size must be >= 1"),
    ):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "nurec_jax.cli.serve_grpc",
                f"--artifact-glob={thin_scene}",
                "--port=0",
                "--compilation-cache-dir=",
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
        assert proc.returncode == 2 and text in proc.stderr, (flags, proc.stderr[-2000:])
    proc = subprocess.run(
        [sys.executable, "-m", "nurec_jax.cli.serve_grpc", "--artifact-glob=/data/*.ply"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 2 and "must end in .usdz" in proc.stderr


def test_sigterm_shuts_down_gracefully(thin_scene):
    # No JAX_PLATFORMS: JAX probes for accelerators as the scene loads, and says nothing about the absent ones.
    proc, _ = _start_server(
        f"--artifact-glob={thin_scene}",
        "--no-enable-nrend",
        "--max-workers",
        "4",
        "--difix-resolution",
        "288",
        "512",
        "--test-scenes-are-valid",
        "--no-warmup-compiles",
        env=_env(jax_platforms=None),
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "shutting down gracefully" in err and "loaded scene 'thin-street'" in err
    assert PROBE_NOISE not in err
    # One log format for every module (the server's, absl's, JAX's): time level module: message.
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ", line)
        for line in lines
    ), lines[:5]


def test_serve_grpc_logs_json_lines(thin_scene):
    proc, _ = _start_server(
        f"--artifact-glob={thin_scene}",
        "--log-format=json",
        "--log-level=INFO",
        "--test-scenes-are-valid",
        "--no-warmup-compiles",
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    entries = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is one JSON object
    assert entries and all(set(e) >= {"time", "level", "module", "message"} for e in entries)
    assert any(e["module"] == "nurec_jax.server.app" and "serving SensorsimService" in e["message"] for e in entries)
    assert any("shutting down gracefully" in e["message"] for e in entries)
    bad = subprocess.run(
        [sys.executable, "-m", "nurec_jax.cli.serve_grpc", "--log-format=xml"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--log-format" in bad.stderr


def test_render_grpc_without_a_server_gives_up_after_the_connect_deadline(thin_scene, tmp_path):
    # Port 1 on loopback: nothing listens. The per-request --timeout-s (600 s) does not apply.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nurec_jax.cli.render_grpc",
            f"--artifact-path={thin_scene}",
            f"--output-dir={tmp_path}",
            "--host=127.0.0.1",
            "--port=1",
            "--connect-timeout-s=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "render-grpc: waiting for server at 127.0.0.1:1 (up to 2 s)" in proc.stdout
    assert proc.stderr.strip() == (
        "render-grpc: no server answered at 127.0.0.1:1 within 2 s (connection refused); "
        "start serve-grpc there, or pass --host / --port"
    )


def test_plaintext_render_grpc_against_a_tls_server_says_so(thin_scene, tmp_path):
    server, port = _start_server(
        f"--artifact-glob={thin_scene}", f"--tls-cert-file={TLS / 'server.pem'}", f"--tls-key-file={TLS / 'server.key'}"
    )
    base = [
        sys.executable,
        "-m",
        "nurec_jax.cli.render_grpc",
        f"--artifact-path={thin_scene}",
        f"--output-dir={tmp_path}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--connect-timeout-s=2",
    ]
    try:
        proc = subprocess.run(base, capture_output=True, text=True, timeout=120, env=_env())
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            (
                f"render-grpc: no server answered at 127.0.0.1:{port} within 2 s (the server closed the connection); "
                "a server with TLS needs --tls-ca-file"
            )
        ]
        # And the reverse: a TLS client against a plaintext port.
        plain, plain_port = _start_server(f"--artifact-glob={thin_scene}")
        try:
            proc = subprocess.run(
                base[:-2]
                + [
                    f"--port={plain_port}",
                    "--connect-timeout-s=2",
                    f"--tls-ca-file={TLS / 'ca.pem'}",
                    "--tls-server-name=localhost",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env=_env(),
            )
        finally:
            plain.kill()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            (
                f"render-grpc: no server answered at 127.0.0.1:{plain_port} within 2 s (TLS handshake failed); "
                "the server is plaintext: leave out the --tls-* flags"
            )
        ]
    finally:
        server.kill()
        server.communicate(timeout=60)


def test_render_grpc_against_serve_grpc(thin_scene, tmp_path):
    cache = tmp_path / "jax-cache"
    server, port = _start_server(
        f"--artifact-glob={thin_scene}",
        "--test-scenes-are-valid",
        "--no-warmup-compiles",
        "--enable-editing-actors",
        f"--compilation-cache-dir={cache}",
    )
    out = tmp_path / "out"
    base = [
        sys.executable,
        "-m",
        "nurec_jax.cli.render_grpc",
        f"--artifact-path={thin_scene}",
        f"--output-dir={out}",
        f"--port={port}",
        "--host=127.0.0.1",
        "--height=24",
        f"--camera-id={CAM}",
    ]
    try:
        bad = subprocess.run(
            base + ['--edit-assets={"replace": [{"original_id": "99", "replacement_id": "box_truck"}]}'],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
        assert bad.returncode == 1 and "Failed to edit assets: replace[0].original_id" in bad.stderr, bad.stderr[-2000:]
        # A scene the server does not serve: the client never asks it to read a local path (refused).
        other = write_thin_scene(tmp_path / "other.usdz", keep_every=200, scene_id="not-served")
        bad = subprocess.run(
            [a if not a.startswith("--artifact-path") else f"--artifact-path={other}" for a in base],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
        assert bad.returncode == 1 and "does not serve scene 'not-served'" in bad.stderr, bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr
        bad = subprocess.run(
            base + ["--edit-assets={replace: 3}"], capture_output=True, text=True, timeout=300, env=_env()
        )
        assert bad.returncode == 1 and "--edit-assets: not an EditAssetsRequest" in bad.stderr, bad.stderr[-2000:]
        edit = '{"replace": [{"original_id": "3", "replacement_id": "sedan_orange"}]}'
        proc = subprocess.run(
            base
            + [
                "--frame-step=50",
                "--image-format=png",
                "--demo-actor-transform",
                "--shutdown-server-on-completion",
                "--lidar",
                "--lidar-type=AT128",
                "--lidar-frame-step=200",
                f"--edit-assets={edit}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "edit_assets: Success (1 replaced" in proc.stdout and "edits undone" in proc.stdout
        # Progress as a user sees it off a terminal (the line formats: tests/test_render_grpc_plan.py).
        assert f"render-grpc: waiting for server at 127.0.0.1:{port}" in proc.stdout
        assert (
            f"{CAM}: compiling 42x24 images on the server unless it already has (first request of this size)"
            in proc.stderr
        ), proc.stderr[-3000:]
        assert f"{CAM}: first frame in " in proc.stderr
        assert "lidar_top_360fov: compiling the AT128 lidar pass on the server unless it already has" in proc.stderr
        assert PROBE_NOISE not in proc.stderr
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
    # 120 frames recorded at 10 Hz, every 50th rendered: frames 5 s apart, so the animations play at 0.2 fps.
    with Image.open(out / f"{CAM}.gif") as gif:
        assert [f.info["duration"] for f in ImageSequence.Iterator(gif)] == [5000] * 3
    import imageio.v3 as iio

    video = iio.imread(out / f"{CAM}.mp4", plugin="FFMPEG")
    assert video.shape == (3, 24, 42, 3)
    assert iio.immeta(out / f"{CAM}.mp4", plugin="FFMPEG")["fps"] == pytest.approx(0.2, abs=0.01)
    first = np.asarray(Image.open(files[0]).convert("RGB"), np.float32)
    assert np.abs(video[0].astype(np.float32) - first).mean() < 12  # the first image, through H.264
    stamps = json.loads((out / "timestamps.json").read_text())
    assert [s["file"] for s in stamps[CAM]] == [f.name for f in files]
    assert json.loads((out / "render_grpc_cli_args.json").read_text())["height"] == 24
    assert "server shut down" in proc.stdout
    assert f"{out / CAM}.mp4  (3 frames at 0.2 fps)" in proc.stdout
    assert any(cache.iterdir())  # the render functions went to the persistent compilation cache
    from nurec_jax.pointcloud import read_ply_points

    plys = sorted((out / "lidar_top_360fov").glob("*.ply"))
    assert len(plys) == 1 and (out / "lidar_top_360fov" / (plys[0].stem + "_bev.png")).exists()
    cloud = read_ply_points(str(plys[0]))
    assert len(cloud["x"]) > 10000 and set(cloud) == {"x", "y", "z", "intensity", "ring"}
