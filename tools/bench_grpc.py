"""render_rgb latency (p50, p95) and throughput over gRPC for 1 and 4 concurrent clients.

    python tools/bench_grpc.py [--height 180] [--requests 16] [--clients 1,4] [--address host:port]

Without --address an in-process server on 127.0.0.1 serves the bundled sample scene. One warm-up
request per camera size is sent first (it loads the scene and compiles); the figures are steady state.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import grpc
import jax
import numpy as np

from nurec_jax import data, read_scene_metadata
from nurec_jax._proto import common_pb2, sensorsim_pb2, sensorsim_pb2_grpc
from nurec_jax.server import convert


def _requests(scene_path, scene_id, camera, height, fmt):
    meta = read_scene_metadata(scene_path)
    cal = meta.cameras[camera]
    spec = convert.camera_spec_from_intrinsics(camera, cal.intrinsics)
    out = []
    for s, e in cal.frame_timestamps_us:
        poses = [convert.se3_to_grpc_pose(meta.trajectory.pose_at(int(t)) @ cal.T_sensor_rig) for t in (s, e)]
        out.append(sensorsim_pb2.RGBRenderRequest(
            scene_id=scene_id, resolution_h=height, resolution_w=1, camera_intrinsics=spec, frame_start_us=int(s),
            frame_end_us=int(e), sensor_pose=sensorsim_pb2.PosePair(start_pose=poses[0], end_pose=poses[1]),
            image_format=fmt, image_quality=95.0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--address", default=None, help="a running server; default: start one in-process")
    p.add_argument("--scene", default=data.sample_scene_path())
    p.add_argument("--camera", default="camera_front_wide_120fov")
    p.add_argument("--height", type=int, default=180)
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--clients", default="1,4")
    p.add_argument("--format", choices=["jpeg", "png"], default="jpeg")
    p.add_argument("--max-workers", type=int, default=4)
    p.add_argument("--compilation-cache-dir", default=None, help="JAX persistent compilation cache (in-process)")
    args = p.parse_args()
    fmt = sensorsim_pb2.JPEG if args.format == "jpeg" else sensorsim_pb2.PNG
    server = None
    address = args.address
    if address is None:
        from nurec_jax.server.app import create_server
        from nurec_jax.server.options import ServerOptions

        server, port = create_server("127.0.0.1:0", ServerOptions(artifact_glob=args.scene, port=0,
                                                                  max_workers=args.max_workers,
                                                                  compilation_cache_dir=args.compilation_cache_dir))
        address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = sensorsim_pb2_grpc.SensorsimServiceStub(channel)
    scene_id = read_scene_metadata(args.scene).scene_id
    reqs = _requests(args.scene, scene_id, args.camera, args.height, fmt)
    version = stub.get_version(common_pb2.Empty(), wait_for_ready=True, timeout=60)
    print(f"server {version.version_id} ({version.git_hash}) at {address}; JAX {jax.__version__} on "
          f"{jax.devices()[0].device_kind if server else 'remote device'}; {args.camera} at height {args.height}, "
          f"{args.format}")
    start = time.perf_counter()
    for r in reqs[:: max(1, len(reqs) // 4)]:  # warm-up: load, compile and grow capacities
        stub.render_rgb(r, timeout=1800)
    print(f"warm-up (load + compile + capacity growth): {time.perf_counter() - start:.1f} s")
    for clients in (int(c) for c in args.clients.split(",")):
        batch = [reqs[(i * 7) % len(reqs)] for i in range(args.requests)]

        def one(r):
            t = time.perf_counter()
            stub.render_rgb(r, timeout=1800)
            return time.perf_counter() - t

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            lat = np.asarray(list(pool.map(one, batch)))
        wall = time.perf_counter() - start
        print(f"{clients} client(s): p50 {np.percentile(lat, 50) * 1e3:.0f} ms, p95 {np.percentile(lat, 95) * 1e3:.0f} ms, "
              f"throughput {len(batch) / wall:.2f} frames/s ({len(batch)} requests in {wall:.1f} s)")
    channel.close()
    if server is not None:
        server.stop(5)


if __name__ == "__main__":
    main()
