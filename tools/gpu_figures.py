"""The GPU figures of one machine, printed and written to one JSON file (run by tools/gpu_check.sh).

    python tools/gpu_figures.py --out figures.json                  # the full set (GPU: a few minutes)
    python tools/gpu_figures.py --width 160 --gaussians 200000 --out /tmp/f.json   # a quick CPU try-out

Figures (each names the device):
  - camera: the sample's front FTheta rolling-shutter camera at --width (1920 -> 1920x1080), the sample
    densified to each --gaussians count (every Gaussian split into jittered smaller ones, so the image and
    its depth complexity stay those of the street): forward ms and forward+backward (pose gradient) ms,
    compile seconds, peak device memory;
  - compile with the persistent compilation cache: a child process compiles the same frame cold into an
    empty cache, a second child compiles it again from that cache;
  - lidar: one PANDAR128 spin of the sample, ms;
  - gRPC: render_rgb p50 at the same size (JPEG 95) and a batch_render_rgb step of every sample camera,
    against a server in a child process (tools/bench_grpc.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import nurec_jax
from nurec_jax import cameras, lidar_models
from nurec_jax import math as nmath
from nurec_jax import renderer as RR
from nurec_jax.poses import PosePair
from nurec_jax.types import Gaussians

_WIDTH = flags.DEFINE_integer("width", 1920, "Camera output width (height keeps the aspect).")
_GAUSSIANS = flags.DEFINE_list("gaussians", ["1000000", "3000000"], "Densified scene sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions after warm-up.")
_OUT = flags.DEFINE_string("out", "gpu_figures.json", "Where the JSON figures go.")
_GRPC = flags.DEFINE_bool("grpc", True, "Also measure through gRPC (tools/bench_grpc.py).")
_COMPILE_CHILD = flags.DEFINE_string("compile_child", None, "(internal) compile once with this cache dir.")

_CAMERA = "camera_front_wide_120fov"


def densified(g: Gaussians, n: int, seed: int = 0) -> Gaussians:
    """`g` with about `n` Gaussians: each split into k jittered copies with scales / k^(1/3)."""
    k = max(1, -(-n // g.count))
    if k == 1:
        return g
    rng = np.random.default_rng(seed)
    means, quats, scales = (np.asarray(x) for x in (g.means, g.quats, g.scales))
    rot = np.asarray(nmath.quat_to_matrix(jnp.asarray(quats)))
    z = rng.standard_normal((g.count, k, 3)).astype(np.float32) * 0.5
    new_means = means[:, None] + np.einsum("nij,nkj->nki", rot, z * scales[:, None])
    rep = lambda x: np.repeat(np.asarray(x), k, axis=0)  # noqa: E731
    return Gaussians(
        jnp.asarray(new_means.reshape(-1, 3)),
        jnp.asarray(rep(quats)),
        jnp.asarray(rep(scales) / np.float32(k ** (1 / 3))),
        jnp.asarray(rep(g.opacities)),
        jnp.asarray(rep(g.sh)),
        g.sh_degree,
    )


def _frame(scene, width):
    meta = scene.metadata
    cal = meta.cameras[_CAMERA]
    s, e = (int(t) for t in cal.frame_timestamps_us[30])
    pose = RR.rig_camera_poses(meta, _CAMERA, s, e)
    actors = RR.track_actor_poses(meta, scene.gaussians.track_ids, s, e)
    cam = cameras.camera_at_resolution(cameras.camera_from_intrinsics(cal.intrinsics), width, 0)
    return cam, pose, actors


def _timed(fn, repeats):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def _peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _camera_figures(scene, n):
    g = dataclasses.replace(
        scene.gaussians, static=densified(scene.gaussians.static, n - scene.gaussians.dynamic.count)
    )
    count = g.static.count + g.dynamic.count
    cam, pose, actors = _frame(scene, _WIDTH.value)
    r = RR.Renderer()
    t = time.perf_counter()
    out = r.render(g, cam, pose, actors, cache_key=("fig", count))
    jax.block_until_ready(out)
    first_s = time.perf_counter() - t
    fwd = _timed(lambda: r.render(g, cam, pose, actors, cache_key=("fig", count)).rgb, _REPEATS.value)
    opts = r.options_for(cam, ("fig", count))

    def loss(delta):
        p = PosePair(pose.start.perturb(delta), pose.end.perturb(delta))
        return jnp.mean(nurec_jax.render.render(g, cam, p, actors, opts).rgb)

    grad = jax.jit(jax.grad(loss))
    zero = jnp.zeros(6, jnp.float32)
    t = time.perf_counter()
    jax.block_until_ready(grad(zero))
    grad_compile_s = time.perf_counter() - t
    fwd_bwd = _timed(lambda: grad(zero), _REPEATS.value)
    return dict(
        gaussians=count,
        size=f"{cam.width}x{cam.height}",
        pairs=int(out.num_pairs),
        first_frame_s=first_s,
        forward_ms=fwd,
        forward_backward_ms=fwd_bwd,
        grad_compile_s=grad_compile_s,
        peak_device_bytes=_peak_bytes(),
    )


def _compile_once(cache_dir):
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    scene = nurec_jax.load_scene(nurec_jax.sample_scene_path())
    cam, pose, actors = _frame(scene, _WIDTH.value)
    t = time.perf_counter()
    jax.block_until_ready(RR.Renderer().render(scene.gaussians, cam, pose, actors).rgb)
    print(json.dumps({"first_frame_s": time.perf_counter() - t}))


def _compile_figures():
    with tempfile.TemporaryDirectory() as cache:
        runs = []
        for _ in range(2):
            res = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--compile_child={cache}", f"--width={_WIDTH.value}"],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(res.stdout.strip().splitlines()[-1])["first_frame_s"])
    return dict(first_frame_cold_s=runs[0], first_frame_with_persistent_cache_s=runs[1])


def _lidar_figures(scene):
    meta = scene.metadata
    model = lidar_models.DEVICES["PANDAR128"]()
    mount = next(iter(meta.lidars.values())).T_sensor_rig
    t0 = int(meta.trajectory.timestamps_us[10])
    t1 = t0 + int(1e6 / model.spin_frequency_hz)
    pose = PosePair.from_matrices(*(np.asarray(meta.trajectory.pose_at(t) @ mount, np.float32) for t in (t0, t1)))
    actors = RR.track_actor_poses(meta, scene.gaussians.track_ids, t0, t1)
    caster = RR.LidarCaster()
    t = time.perf_counter()
    caster.cast(scene.gaussians, model, pose, actors)
    first = time.perf_counter() - t
    ts = []
    for _ in range(max(1, _REPEATS.value // 2)):
        t = time.perf_counter()
        caster.cast(scene.gaussians, model, pose, actors)
        ts.append(time.perf_counter() - t)
    return dict(lidar="PANDAR128", rays=model.rays_per_spin, first_spin_s=first, spin_ms=float(np.median(ts)) * 1e3)


def _grpc_figures():
    height = round(_WIDTH.value * 9 / 16)
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "bench_grpc.py"),
            f"--height={height}",
            "--requests=8",
            "--steps=4",
            "--clients=1",
        ],
        capture_output=True,
        text=True,
    )
    return dict(
        height=height,
        output=res.stdout.strip().splitlines()[-6:],
        rc=res.returncode,
        stderr_tail=res.stderr[-1500:] if res.returncode else "",
    )


def _main(argv):
    del argv
    if _COMPILE_CHILD.value:
        return _compile_once(_COMPILE_CHILD.value)
    dev = jax.devices()[0]
    figures = dict(jax=jax.__version__, backend=jax.default_backend(), device=dev.device_kind, camera=[])

    def save():
        with open(_OUT.value, "w") as f:
            json.dump(figures, f, indent=1)

    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}", flush=True)
    scene = nurec_jax.load_scene(nurec_jax.sample_scene_path())
    steps = [("compile", _compile_figures), ("lidar", lambda: _lidar_figures(scene))]
    if _GRPC.value:
        steps.append(("grpc", _grpc_figures))
    for n in (int(x) for x in _GAUSSIANS.value):
        row = _camera_figures(scene, n)
        figures["camera"].append(row)
        print(json.dumps(row), flush=True)
        save()
    for name, fn in steps:
        figures[name] = fn()
        print(name, json.dumps(figures[name]), flush=True)
        save()
    print(f"figures written to {_OUT.value}")


if __name__ == "__main__":
    app.run(_main)
