"""gRPC latency and throughput against a server in a separate process: render_rgb (p50, p95) for 1 and 4
concurrent clients, and batch_render_rgb of every camera of the scene at one frame (one simulator step).

    python tools/bench_grpc.py [--height 360] [--requests 16] [--clients 1,4] [--steps 8]
    python tools/bench_grpc.py --height 360 --baseline-python ../base/.venv/bin/python
    python tools/bench_grpc.py --address host:port        # a server that is already running

Without --address the script starts `nurec_jax.cli.serve_grpc` in a child process with this venv's
interpreter (or --server-python) and talks to it as a client would. With --baseline-python the same
requests also go to a server run by a baseline checkout's interpreter (e.g. a `git worktree` of the
previous commit), on the same machine one after the other, and every figure is printed with the
baseline's and the speed-up ratio beside it. One warm-up pass per request kind is sent first (it loads
the scene, compiles and grows capacities); the figures are steady state.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

from nurec_jax import data, read_scene_metadata
from nurec_jax._proto import common_pb2, sensorsim_pb2, sensorsim_pb2_grpc
from nurec_jax.server import convert


def _request(meta, scene_id, camera, frame, height, fmt):
    cal = meta.cameras[camera]
    s, e = (int(t) for t in cal.frame_timestamps_us[frame % len(cal.frame_timestamps_us)])
    poses = [convert.se3_to_grpc_pose(meta.trajectory.pose_at(t) @ cal.T_sensor_rig) for t in (s, e)]
    return sensorsim_pb2.RGBRenderRequest(
        scene_id=scene_id,
        resolution_h=height,
        resolution_w=1,
        camera_intrinsics=convert.camera_spec_from_intrinsics(camera, cal.intrinsics),
        frame_start_us=s,
        frame_end_us=e,
        sensor_pose=sensorsim_pb2.PosePair(start_pose=poses[0], end_pose=poses[1]),
        image_format=fmt,
        image_quality=95.0,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(python: str, scene: str, max_workers: int):
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    # cwd: a scratch folder, so the interpreter imports its own checkout's nurec_jax (editable install).
    proc = subprocess.Popen(
        [
            os.path.abspath(python),
            "-m",
            "nurec_jax.cli.serve_grpc",
            f"--artifact_glob={scene}",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--max_workers={max_workers}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tempfile.gettempdir(),
    )
    return proc, f"127.0.0.1:{port}", log.name


def _measure(address: str, args, fmt) -> dict:
    """All figures (seconds) against the server at `address`."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = sensorsim_pb2_grpc.SensorsimServiceStub(channel)
    meta = read_scene_metadata(args.scene)
    scene_id = meta.scene_id
    version = stub.get_version(common_pb2.Empty(), wait_for_ready=True, timeout=300)
    print(f"  server {version.version_id} at {address}", flush=True)
    n_frames = len(meta.cameras[args.camera].frame_timestamps_us)
    frames = [(i * 7) % n_frames for i in range(args.requests)]
    single = [_request(meta, scene_id, args.camera, f, args.height, fmt) for f in frames]
    cams = sorted(meta.cameras)
    steps = [
        sensorsim_pb2.BatchRGBRenderRequest(
            items=[
                sensorsim_pb2.BatchRGBRenderRequestItem(
                    camera_name=c, request=_request(meta, scene_id, c, f, args.height, fmt)
                )
                for c in cams
            ]
        )
        for f in frames[: args.steps]
    ]
    out: dict = {}
    t = time.perf_counter()
    stub.render_rgb(single[0], timeout=3600)
    out["first_render_s"] = time.perf_counter() - t
    for r in single[1:4]:
        stub.render_rgb(r, timeout=3600)
    t = time.perf_counter()
    first = stub.batch_render_rgb(steps[0], timeout=3600)
    out["first_batch_s"] = time.perf_counter() - t
    failed = [it.camera_name for it in first.items if not it.success]
    if failed:
        raise SystemExit(f"batch items failed: {failed}")
    stub.batch_render_rgb(steps[1 % len(steps)], timeout=3600)
    for clients in (int(c) for c in args.clients.split(",")):

        def one(r):
            t0 = time.perf_counter()
            stub.render_rgb(r, timeout=3600)
            return time.perf_counter() - t0

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            lat = np.asarray(list(pool.map(one, single)))
        wall = time.perf_counter() - start
        out[f"render_p50_{clients}"] = float(np.percentile(lat, 50))
        out[f"render_p95_{clients}"] = float(np.percentile(lat, 95))
        out[f"fps_{clients}"] = len(single) / wall
    lat = []
    for r in steps:
        t0 = time.perf_counter()
        stub.batch_render_rgb(r, timeout=3600)
        lat.append(time.perf_counter() - t0)
    out["batch_step_p50"] = float(np.median(lat))
    out["batch_cameras"] = len(cams)
    channel.close()
    return out


def _run(python: str | None, args, fmt) -> dict:
    if args.address and python is None:
        return _measure(args.address, args, fmt)
    proc, address, log = _start_server(python or sys.executable, args.scene, args.max_workers)
    try:
        return _measure(address, args, fmt)
    except Exception:
        print(open(log).read()[-3000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--address", default=None, help="a running server; default: start one in a child process")
    p.add_argument("--server-python", default=None, help="interpreter that runs the server (default: this one)")
    p.add_argument("--baseline-python", default=None, help="also measure a server run by this interpreter")
    p.add_argument("--scene", default=data.sample_scene_path())
    p.add_argument("--camera", default="camera_front_wide_120fov")
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--requests", type=int, default=16, help="render_rgb requests per concurrency level")
    p.add_argument("--steps", type=int, default=6, help="batch_render_rgb steps (every camera, one frame)")
    p.add_argument("--clients", default="1,4")
    p.add_argument("--format", choices=["jpeg", "png"], default="jpeg")
    p.add_argument("--max-workers", type=int, default=4)
    args = p.parse_args()
    fmt = sensorsim_pb2.JPEG if args.format == "jpeg" else sensorsim_pb2.PNG
    base = {}
    if args.baseline_python:
        print(f"baseline server ({args.baseline_python}):", flush=True)
        base = _run(args.baseline_python, args, fmt)
    print(f"server ({args.address or args.server_python or sys.executable}):", flush=True)
    ours = _run(args.server_python, args, fmt)
    print(
        f"{args.camera} at height {args.height}, {args.format} 95; machine: {os.cpu_count()} CPUs "
        f"(server JAX backend as the server reports it in its log)"
    )

    def fig(key, scale=1e3, unit="ms", higher_better=False):
        v = ours[key] * scale
        if key not in base:
            return f"{v:.0f} {unit}"
        b = base[key] * scale
        ratio = v / b if higher_better else b / max(v, 1e-9)
        return f"{v:.0f} {unit} (base {b:.0f}, {ratio:.1f}x)"

    print(f"first render_rgb (load + compile): {fig('first_render_s', 1, 's')}")
    print(f"first batch_render_rgb ({ours['batch_cameras']} cameras, their compiles): {fig('first_batch_s', 1, 's')}")
    for clients in (int(c) for c in args.clients.split(",")):
        print(
            f"render_rgb, {clients} client(s): p50 {fig(f'render_p50_{clients}')}, "
            f"p95 {fig(f'render_p95_{clients}')}, throughput {ours[f'fps_{clients}']:.2f} frames/s"
        )
    print(f"batch_render_rgb step of {ours['batch_cameras']} cameras: p50 {fig('batch_step_p50')}")


if __name__ == "__main__":
    main()
