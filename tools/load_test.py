"""Load and fault test of `serve-grpc` on loopback: concurrent clients, latency of health and metadata
calls under load and during the first compile, RSS across identical rounds, and kill -9 mid-render and
mid-download followed by a restart.

    python tools/load_test.py [--clients 16] [--renders 50] [--rounds 3] [--heights 64,96,120]

Bounded in count and time (each phase has a deadline); prints one figure per line. The server runs as
a separate process on a thinned copy of the sample scene (every 25th Gaussian), as a user would run it.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import sys
import tempfile
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve_process import ServerDidNotStart, serve_grpc_env, start_serve_grpc  # noqa: E402
from thin_scene import write_thin_scene  # noqa: E402

from nurec_jax import read_scene_metadata  # noqa: E402
from nurec_jax._proto import common_pb2, sensorsim_pb2, sensorsim_pb2_grpc  # noqa: E402
from nurec_jax.server import convert  # noqa: E402

CAM = "camera_front_wide_120fov"
SCENE_ID = "load-street"


def start_server(scene: str, cache_dir: str, *extra: str, timeout_s: float = 180.0):
    """serve-grpc in its own process; returns (process, port) once it listens."""
    env = serve_grpc_env(os.environ.get("JAX_PLATFORMS", "cpu"))
    flags = (f"--artifact-glob={scene}", f"--download-cache-dir={cache_dir}", "--compilation-cache-dir=")
    try:
        return start_serve_grpc(*flags, "--max-workers=2", *extra, env=env, timeout_s=timeout_s, drain=True)
    except ServerDidNotStart as e:
        raise SystemExit(str(e)) from None


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Client:
    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = sensorsim_pb2_grpc.SensorsimServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self):
        self.channel.close()


def render_request(meta, frame: int, height: int, scene_id: str = SCENE_ID):
    cal = meta.cameras[CAM]
    s, e = (int(t) for t in cal.frame_timestamps_us[frame % len(cal.frame_timestamps_us)])
    poses = [convert.se3_to_grpc_pose(meta.trajectory.pose_at(t) @ cal.T_sensor_rig) for t in (s, e)]
    return sensorsim_pb2.RGBRenderRequest(
        scene_id=scene_id,
        resolution_h=height,
        camera_intrinsics=convert.camera_spec_from_intrinsics(CAM, cal.intrinsics),
        frame_start_us=s,
        frame_end_us=e,
        sensor_pose=sensorsim_pb2.PosePair(start_pose=poses[0], end_pose=poses[1]),
        image_format=sensorsim_pb2.JPEG,
        image_quality=95.0,
    )


def p(values, q):
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def probe_during(port: int, stop: threading.Event, out: dict) -> None:
    """Health and get_available_cameras every 20 ms until `stop`."""
    c = Client(port)
    health, meta = [], []
    while not stop.is_set():
        t = time.perf_counter()
        c.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        health.append(time.perf_counter() - t)
        t = time.perf_counter()
        c.stub.get_available_cameras(sensorsim_pb2.AvailableCamerasRequest(scene_id=SCENE_ID), timeout=10)
        meta.append(time.perf_counter() - t)
        time.sleep(0.02)
    c.close()
    out["health"], out["meta"] = health, meta


def first_compile(port: int, meta) -> None:
    stop, out = threading.Event(), {}
    prober = threading.Thread(target=probe_during, args=(port, stop, out))
    prober.start()
    c = Client(port)
    t = time.perf_counter()
    c.stub.render_rgb(render_request(meta, 0, 36), timeout=600)
    compile_s = time.perf_counter() - t
    stop.set()
    prober.join()
    c.close()
    print(
        f"first render (compile) {compile_s:.1f} s; during it: health p99 {p(out['health'], 99):.1f} ms, "
        f"get_available_cameras p99 {p(out['meta'], 99):.1f} ms ({len(out['health'])} probes)"
    )


def load_round(port: int, meta, clients: int, renders: int, heights: list[int]) -> dict:
    failures: list[str] = []
    render_s, health_s, meta_s = [], [], []
    lock = threading.Lock()

    def worker(k: int):
        c = Client(port)
        for i in range(renders):
            try:
                t = time.perf_counter()
                c.stub.render_rgb(render_request(meta, k * renders + i, heights[(k + i) % len(heights)]), timeout=300)
                r = time.perf_counter() - t
                t = time.perf_counter()
                c.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                h = time.perf_counter() - t
                t = time.perf_counter()
                c.stub.get_available_scenes(common_pb2.Empty(), timeout=10)
                m = time.perf_counter() - t
                with lock:
                    render_s.append(r)
                    health_s.append(h)
                    meta_s.append(m)
            except grpc.RpcError as e:
                with lock:
                    failures.append(f"{e.code().name}: {e.details()[:100]}")
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return dict(
        failures=failures,
        wall=wall,
        renders=len(render_s),
        render_p50=p(render_s, 50),
        render_p99=p(render_s, 99),
        health_p99=p(health_s, 99),
        meta_p99=p(meta_s, 99),
    )


def kill_during_render(scene: str, cache_dir: str, meta) -> None:
    proc, port = start_server(scene, cache_dir)
    c = Client(port)
    fut = c.stub.render_rgb.future(render_request(meta, 5, 360), timeout=600)  # a compile + a large frame
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    try:
        fut.result()
        outcome = "finished before the kill"
    except grpc.RpcError as e:
        outcome = e.code().name
    c.close()
    proc, port = start_server(scene, cache_dir)
    c = Client(port)
    t = time.perf_counter()
    c.stub.render_rgb(render_request(meta, 5, 36), timeout=600)
    print(
        f"kill -9 during a render: client saw {outcome}; restarted, first render served in "
        f"{time.perf_counter() - t:.1f} s"
    )
    c.close()
    proc.terminate()
    proc.wait(60)


class _Drip(http.server.BaseHTTPRequestHandler):
    """Serves a large body slowly (a download the kill interrupts)."""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(50 << 20))
        self.end_headers()
        try:
            for _ in range(5000):
                self.wfile.write(b"\0" * 4096)
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def kill_during_download(scene: str, cache_dir: str, meta, extra: tuple[str, ...]) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/big.usdz"
    proc, port = start_server(scene, cache_dir, *extra)
    c = Client(port)
    md = (("x-nre-scene-url", url), ("x-nre-scene-id", "dripped"))
    fut = c.stub.render_rgb.future(render_request(meta, 5, 36, "dripped"), metadata=md, timeout=120)
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    try:
        fut.result()
    except grpc.RpcError:
        pass
    c.close()
    left_before = sorted(os.listdir(cache_dir))
    proc, port = start_server(scene, cache_dir, *extra)
    left_after = sorted(os.listdir(cache_dir))
    c = Client(port)
    c.stub.render_rgb(render_request(meta, 5, 36), timeout=600)
    print(
        f"kill -9 during a download: cache dir after the kill {left_before}, after restart {left_after}; "
        "first render served"
    )
    c.close()
    proc.terminate()
    proc.wait(60)
    httpd.shutdown()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--renders", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--heights", default="64,96,120")
    ap.add_argument("--skip-faults", action="store_true")
    ap.add_argument(
        "--download-flags",
        default="--download-allow-private",
        help="extra serve-grpc flags for the download fault (tests run on loopback)",
    )
    args = ap.parse_args(argv)
    heights = [int(h) for h in args.heights.split(",")]
    with tempfile.TemporaryDirectory(prefix="nurec_load_") as tmp:
        scene = write_thin_scene(os.path.join(tmp, "thin.usdz"), keep_every=25, scene_id=SCENE_ID)
        meta = read_scene_metadata(scene)
        cache_dir = os.path.join(tmp, "downloads")
        proc, port = start_server(scene, cache_dir)
        try:
            first_compile(port, meta)
            c = Client(port)
            for h in heights:  # compile every size once, so the rounds compare like with like
                c.stub.render_rgb(render_request(meta, 0, h), timeout=600)
            c.close()
            for r in range(args.rounds):
                res = load_round(port, meta, args.clients, args.renders, heights)
                print(
                    f"round {r + 1}: {res['renders']} renders by {args.clients} clients in {res['wall']:.1f} s, "
                    f"{len(res['failures'])} failures {res['failures'][:3]}; render p50 {res['render_p50']:.0f} ms "
                    f"p99 {res['render_p99']:.0f} ms; health p99 {res['health_p99']:.1f} ms; "
                    f"get_available_scenes p99 {res['meta_p99']:.1f} ms; server RSS {rss_mb(proc.pid):.0f} MiB"
                )
        finally:
            proc.terminate()
            proc.wait(60)
        if not args.skip_faults:
            kill_during_render(scene, cache_dir, meta)
            kill_during_download(scene, cache_dir, meta, tuple(args.download_flags.split()))


if __name__ == "__main__":
    main()
