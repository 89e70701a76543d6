"""The multi-device scenario of test_devices.py, run in a subprocess (JAX's device count is fixed when it
initialises, and the pytest worker has initialised it with one CPU device):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/server/devices_scenario.py WORKDIR

Writes two thin scenes, serves them from one in-process Server on 4 CPU devices, then from a server
without --devices, and prints one JSON object of what it saw (test_devices.py asserts on it).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import sys
import threading

# A script, not a test module: Python puts its own directory (grpc_helpers) on sys.path, and this line adds
# the repository root for the `tools` package (pytest's `pythonpath` setting does that for the tests).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from grpc_helpers import connect, decode, rgb_request  # noqa: E402

from nurec_jax import read_scene_metadata  # noqa: E402
from nurec_jax._proto import common_pb2  # noqa: E402
from nurec_jax.server import requests as req_lib  # noqa: E402
from nurec_jax.server.app import Server  # noqa: E402
from nurec_jax.server.options import ServerOptions  # noqa: E402
from tools.thin_scene import write_thin_scene  # noqa: E402

SCENES = ("thin-a", "thin-b")
E = common_pb2.Empty()


def _start(glob: str, workdir: str, **kw):
    srv = Server(
        ServerOptions(
            artifact_glob=glob,
            port=0,
            compilation_cache_dir=None,
            download_cache_dir=os.path.join(workdir, "downloads"),
            **kw,
        ),
        "127.0.0.1:0",
    )
    port = srv.start()
    assert srv.serving.wait(60)
    channel, stub = connect(port)
    return srv, channel, stub


def _concurrent(srv, stub, requests, barrier_timeout_s: float) -> dict:
    """Sends the requests at once; each device section waits (up to the timeout) until every request has
    entered its own, so the sections overlap exactly when the server lets them run at the same time."""
    barrier = threading.Barrier(len(requests), timeout=barrier_timeout_s)
    broken = []

    def hook(device):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            broken.append(str(device))

    srv.servicer.device_trace, srv.servicer.device_hook = [], hook
    try:
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            images = [decode(f.result(120).image_bytes) for f in [pool.submit(stub.render_rgb, r) for r in requests]]
    finally:
        srv.servicer.device_hook = None
    trace = srv.servicer.device_trace
    srv.servicer.device_trace = None
    starts, ends = [t[1] for t in trace], [t[2] for t in trace]
    return dict(
        sections=[[name, b - min(starts), e - min(starts)] for name, b, e in trace],
        overlap=bool(max(starts) < min(ends)),
        barrier_broken=bool(broken),
        images=images,
    )


def main(workdir: str) -> dict:
    paths = {sid: write_thin_scene(os.path.join(workdir, f"{sid}.usdz"), keep_every=25, scene_id=sid) for sid in SCENES}
    glob = os.path.join(workdir, "*.usdz")
    reqs = {sid: rgb_request(paths[sid], sid, frame=10) for sid in SCENES}
    out: dict = dict(jax_devices=[str(d) for d in jax.devices()])

    # Four devices, two instances at most per scene.
    srv, channel, stub = _start(glob, workdir, devices="all", max_backends_per_scene=2)
    try:
        multi = {sid: decode(stub.render_rgb(reqs[sid]).image_bytes) for sid in SCENES}
        config = dict(stub.get_server_config(E).server_config)
        out["placement"] = {k: v for k, v in config.items() if k.startswith("placement.")}
        out["loaded"] = {s.scene_id: s.loaded_instance_count for s in stub.get_loaded_scenes(E).scenes}
        out["capacity"] = stub.get_loaded_scenes(E).loaded_instance_capacity
        # The render's outputs stay on the scene's device (nothing is copied to device 0).
        sid = SCENES[1]
        meta = read_scene_metadata(paths[sid])
        job = req_lib.prepare_rgb(meta, reqs[sid], editing_enabled=False)
        with srv.scene_cache.use_instance(sid) as inst:
            res = srv.renderer.render(
                inst.scene.gaussians,
                job.camera,
                job.sensor_pose,
                req_lib.job_actor_poses(meta, inst.scene.gaussians.track_ids, job),
                cache_key=(sid,),
            )
            out["output_devices"] = dict(
                scene=str(inst.device),
                rgb=sorted(map(str, res.rgb.devices())),
                num_pairs=sorted(map(str, res.num_pairs.devices())),
            )
        conc = _concurrent(srv, stub, [reqs[s] for s in SCENES], barrier_timeout_s=20)
        out["multi_concurrent"] = {k: v for k, v in conc.items() if k != "images"}
        out["multi_concurrent_same_pixels"] = all(np.array_equal(a, multi[s]) for a, s in zip(conc["images"], SCENES))
        # --max-backends-per-scene: while thin-a is in use, a request for it loads a second instance.
        with srv.scene_cache.use_instance(SCENES[0]):
            second = decode(stub.render_rgb(reqs[SCENES[0]]).image_bytes)
        out["second_instance_same_pixels"] = bool(np.array_equal(second, multi[SCENES[0]]))
        out["placement_after"] = {
            k: v for k, v in dict(stub.get_server_config(E).server_config).items() if k.startswith("placement.scene.")
        }
        out["loaded_after"] = {s.scene_id: s.loaded_instance_count for s in stub.get_loaded_scenes(E).scenes}
    finally:
        channel.close()
        srv.stop(1)

    # The same scenes without --devices: JAX's default device, one lock.
    srv, channel, stub = _start(glob, workdir)
    try:
        single = {sid: decode(stub.render_rgb(reqs[sid]).image_bytes) for sid in SCENES}
        out["same_pixels"] = {sid: bool(np.array_equal(single[sid], multi[sid])) for sid in SCENES}
        out["max_abs_diff"] = {
            sid: int(np.abs(single[sid].astype(int) - multi[sid].astype(int)).max()) for sid in SCENES
        }
        out["single_placement"] = {
            k: v for k, v in dict(stub.get_server_config(E).server_config).items() if k.startswith("placement.")
        }
        conc = _concurrent(srv, stub, [reqs[s] for s in SCENES], barrier_timeout_s=1.0)
        out["single_concurrent"] = {k: v for k, v in conc.items() if k != "images"}
    finally:
        channel.close()
        srv.stop(1)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    print(json.dumps(main(sys.argv[1])), flush=True)
