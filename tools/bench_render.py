"""Render benchmark: compile time and steady-state ms per frame, per camera model and resolution.

    python tools/bench_render.py [--widths=160,320,480] [--repeats=3] [--grad]

Uses the bundled sample scene (117k Gaussians) and its cameras (FTheta, OpenCV pinhole, OpenCV
fisheye), at a recorded frame. Prints the JAX backend and device so figures name their hardware.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import nurec_jax
from nurec_jax import cameras, render as R, renderer as RR

_WIDTHS = flags.DEFINE_list("widths", ["160", "320", "480"], "Output widths (height keeps the aspect).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions after warm-up.")
_CAMERAS = flags.DEFINE_list("cameras", ["camera_front_wide_120fov", "camera_rear_pinhole_70fov",
                                         "camera_left_fisheye_200fov"], "Cameras of the sample scene.")
_GRAD = flags.DEFINE_bool("grad", False, "Also time forward+backward (gradient w.r.t. the pose).")
_FRAME = flags.DEFINE_integer("frame", 30, "Recorded frame index.")


def _main(argv):
    del argv
    dev = jax.devices()[0]
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}")
    scene = nurec_jax.load_scene(nurec_jax.sample_scene_path())
    meta = scene.metadata
    print(f"scene {meta.scene_id}: {scene.gaussians.static.count + scene.gaussians.dynamic.count} Gaussians")
    print(f"{'camera':<28} {'model':<15} {'size':>9} {'pairs':>8} {'compile s':>9} {'ms/frame':>9}"
          + (f" {'fwd+bwd ms':>10}" if _GRAD.value else ""))
    for cam_id in _CAMERAS.value:
        cal = meta.cameras[cam_id]
        s_us, e_us = (int(t) for t in cal.frame_timestamps_us[_FRAME.value])
        pose = RR.rig_camera_poses(meta, cam_id, s_us, e_us)
        actors = RR.track_actor_poses(meta, scene.gaussians.track_ids, s_us, e_us)
        native = cameras.camera_from_intrinsics(cal.intrinsics)
        for w in (int(x) for x in _WIDTHS.value):
            cam = cameras.camera_at_resolution(native, w, 0)
            sizer = RR.Renderer()
            first = sizer.render(scene.gaussians, cam, pose, actors, cache_key=("b",))  # finds capacities
            opts = sizer.options_for(cam, ("b",))
            fn = jax.jit(R.render, static_argnames=("options",))
            t0 = time.perf_counter()
            compiled = fn.lower(scene.gaussians, cam, pose, actors, options=opts).compile()
            compile_s = time.perf_counter() - t0
            compiled(scene.gaussians, cam, pose, actors).rgb.block_until_ready()
            times = []
            for _ in range(_REPEATS.value):
                t0 = time.perf_counter()
                compiled(scene.gaussians, cam, pose, actors).rgb.block_until_ready()
                times.append(time.perf_counter() - t0)
            line = (f"{cam_id:<28} {cam.model:<15} {cam.width:>4}x{cam.height:<4} {int(first.num_pairs):>8} "
                    f"{compile_s:>9.1f} {1e3 * np.median(times):>9.0f}")
            if _GRAD.value:
                def loss(d, cam=cam, pose=pose, actors=actors, opts=opts):
                    p = R.PosePair(pose.start.perturb(d), pose.end.perturb(d))
                    return jnp.mean(R.render(scene.gaussians, cam, p, actors, opts).rgb)
                g = jax.jit(jax.grad(loss))
                g(jnp.zeros(6)).block_until_ready()
                t0 = time.perf_counter()
                for _ in range(_REPEATS.value):
                    g(jnp.zeros(6)).block_until_ready()
                line += f" {1e3 * (time.perf_counter() - t0) / _REPEATS.value:>10.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    app.run(_main)
