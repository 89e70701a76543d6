"""Several accelerators in one process (`serve-grpc --devices`): the time of one render_rgb request, of two
concurrent requests for two scenes on two devices, and their ratio; then the same pair on one device.

    python tools/bench_devices.py --cpu-devices 2                # this CPU split into 2 JAX devices
    python tools/bench_devices.py --devices 0,1 --height 1080    # two GPUs
    python tools/bench_devices.py --keep-every 1 --repeats 10    # the full sample scene, more repeats

Writes two copies of the sample scene (thinned by --keep-every, under two scene ids), starts an in-process
server with `--devices` (each scene lands on its own device), sends one warm-up request per scene
(scene load + compile on each device), then times over gRPC, as a client sees it:

  one:     one request for scene A alone;
  two:     a request for A and one for B sent at the same moment (wall time until both answered);
  ratio:   two / one (1.0: the devices overlap perfectly; 2.0: they serialise);
  one-device pair: the same two requests against a server without --devices (one device, one lock).

Medians of --repeats, the three measurements interleaved. The last line times only the device sections
(the render under its device's lock, from the servicer's `device_trace`): the host work around them
(decoding the request, posing, JPEG encoding, gRPC) is Python and shares one GIL. On CPU the "devices" share the machine's cores (XLA's CPU client already spreads one
render over several threads), so the ratio there says more about free cores than about the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time

_TOOLS = os.path.dirname(os.path.abspath(__file__))


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="0,1", help="--devices of the server under test (two or more ids, or all)")
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="split the CPU into this many JAX devices (XLA_FLAGS=--xla_force_host_platform_"
        "device_count); 0: use the machine's accelerators as they are",
    )
    p.add_argument("--height", type=int, default=180, help="output height of each request (width keeps the aspect)")
    p.add_argument("--keep-every", type=int, default=10, help="thin the sample scene to every k-th Gaussian (1: all)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--camera", default="camera_front_wide_120fov")
    return p.parse_args()


def _pair_request(stub, reqs) -> float:
    with concurrent.futures.ThreadPoolExecutor(len(reqs)) as pool:
        t = time.perf_counter()
        for f in [pool.submit(stub.render_rgb, r, timeout=3600) for r in reqs]:
            f.result()
        return time.perf_counter() - t


def _span(sections) -> float:
    """Seconds from the first device section's start to the last one's end (servicer.device_trace)."""
    return max(e for _, _, e in sections) - min(b for _, b, _ in sections)


def main() -> None:
    args = _args()
    if args.cpu_devices:  # before JAX initialises
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        ).strip()
    sys.path.insert(0, _TOOLS)
    import grpc
    import jax
    from thin_scene import write_thin_scene

    from nurec_jax import read_scene_metadata
    from nurec_jax._proto import common_pb2, sensorsim_pb2, sensorsim_pb2_grpc
    from nurec_jax.server import convert
    from nurec_jax.server.app import Server
    from nurec_jax.server.options import ServerOptions

    devices = jax.devices()
    print(
        f"machine: {os.cpu_count()} CPU cores, JAX {jax.__version__}, {len(devices)} device(s): "
        f"{', '.join(str(d) for d in devices)} ({devices[0].device_kind})",
        flush=True,
    )
    if len(devices) < 2:
        sys.exit("bench_devices: needs two devices (on CPU: --cpu-devices 2)")

    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            sid: write_thin_scene(os.path.join(tmp, f"{sid}.usdz"), keep_every=args.keep_every, scene_id=sid)
            for sid in ("bench-a", "bench-b")
        }
        reqs = []
        for sid, path in paths.items():
            meta = read_scene_metadata(path)
            cal = meta.cameras[args.camera]
            s, e = (int(t) for t in cal.frame_timestamps_us[len(cal.frame_timestamps_us) // 2])
            poses = [convert.se3_to_grpc_pose(meta.trajectory.pose_at(t) @ cal.T_sensor_rig) for t in (s, e)]
            reqs.append(
                sensorsim_pb2.RGBRenderRequest(
                    scene_id=sid,
                    resolution_h=args.height,
                    resolution_w=1,
                    camera_intrinsics=convert.camera_spec_from_intrinsics(args.camera, cal.intrinsics),
                    frame_start_us=s,
                    frame_end_us=e,
                    sensor_pose=sensorsim_pb2.PosePair(start_pose=poses[0], end_pose=poses[1]),
                    image_format=sensorsim_pb2.JPEG,
                    image_quality=95.0,
                )
            )

        def serve(name: str, **kw):
            opts = ServerOptions(
                artifact_glob=os.path.join(tmp, "*.usdz"),
                port=0,
                compilation_cache_dir=None,
                download_cache_dir=os.path.join(tmp, f"downloads-{name}"),
                **kw,
            )
            srv = Server(opts, "127.0.0.1:0")
            channel = grpc.insecure_channel(f"127.0.0.1:{srv.start()}")
            return srv, channel, sensorsim_pb2_grpc.SensorsimServiceStub(channel)

        # Both servers run side by side and the three measurements interleave, so that load from other
        # processes (a shared machine) weighs on each alike.
        # single: no --devices (one device, one lock)
        multi, single = serve("multi", devices=args.devices), serve("single")
        try:
            t = time.perf_counter()
            for r in reqs:  # load each scene on its device and compile there
                multi[2].render_rgb(r, timeout=3600)
            where = {
                k: v
                for k, v in multi[2].get_server_config(common_pb2.Empty()).server_config.items()
                if k.startswith("placement.scene.")
            }
            print(
                f"warm-up (load + compile per device): {time.perf_counter() - t:.1f} s; placement: "
                + ", ".join(f"{k.split('.', 2)[2]} on {v}" for k, v in sorted(where.items())),
                flush=True,
            )
            for r in reqs:
                single[2].render_rgb(r, timeout=3600)
            one, two, single_pair, one_dev, two_dev = [], [], [], [], []
            for _ in range(args.repeats):
                multi[0].servicer.device_trace = []
                t = time.perf_counter()
                multi[2].render_rgb(reqs[0], timeout=3600)
                one.append(time.perf_counter() - t)
                one_dev.append(_span(multi[0].servicer.device_trace))
                multi[0].servicer.device_trace = []
                two.append(_pair_request(multi[2], reqs))
                two_dev.append(_span(multi[0].servicer.device_trace))
                single_pair.append(_pair_request(single[2], reqs))
        finally:
            for srv, channel, _ in (multi, single):
                channel.close()
                srv.stop(1)

    t1, t2, t1d, d1, d2 = (statistics.median(x) for x in (one, two, single_pair, one_dev, two_dev))
    print(
        f"one request:                          {t1 * 1e3:8.1f} ms  (median of {args.repeats}, "
        f"{args.height} px high, keep every {args.keep_every})"
    )
    print(
        f"two concurrent requests, two devices: {t2 * 1e3:8.1f} ms  ratio {t2 / t1:.2f}  "
        f"(1.0: full overlap, 2.0: serialised)"
    )
    print(f"two concurrent requests, one device:  {t1d * 1e3:8.1f} ms  ratio {t1d / t1:.2f}")
    print(
        f"device sections only (render under the device lock, no decode / encode / gRPC): one {d1 * 1e3:.1f} ms, "
        f"two on two devices {d2 * 1e3:.1f} ms from first start to last end, ratio {d2 / d1:.2f}"
    )


if __name__ == "__main__":
    main()
