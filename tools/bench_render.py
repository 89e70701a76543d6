"""Render benchmark: compile time and steady-state ms per frame, per camera model and resolution.

    python tools/bench_render.py [--widths=160,320,480] [--repeats=3] [--grad]
    python tools/bench_render.py --widths=640 --grad --baseline_python=../base/.venv/bin/python

With --baseline_python (the interpreter of another checkout's venv, e.g. a `git worktree` of the
previous commit) the same measurements run there first, in a child process on the same machine, and
each figure is printed with the baseline's and the speed-up ratio beside it.

Uses the bundled sample scene (117k Gaussians) and its cameras (FTheta, OpenCV pinhole, OpenCV
fisheye), at a recorded frame. Prints the JAX backend and device so figures name their hardware.
"""

from __future__ import annotations

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
from nurec_jax import cameras
from nurec_jax import render as R
from nurec_jax import renderer as RR

_WIDTHS = flags.DEFINE_list("widths", ["160", "320", "480"], "Output widths (height keeps the aspect).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions after warm-up.")
_CAMERAS = flags.DEFINE_list(
    "cameras",
    ["camera_front_wide_120fov", "camera_rear_pinhole_70fov", "camera_left_fisheye_200fov"],
    "Cameras of the sample scene.",
)
_GRAD = flags.DEFINE_bool("grad", False, "Also time forward+backward (gradient w.r.t. the pose).")
_FRAME = flags.DEFINE_integer("frame", 30, "Recorded frame index.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the figures as JSON here.")
_BASELINE = flags.DEFINE_string(
    "baseline_python", None, "Interpreter of a baseline checkout's venv: measure there too and print ratios."
)


def _baseline_rows(argv):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "base.json")
        args = [a for a in argv[1:] if not a.startswith(("--baseline_python", "--json_out"))]
        print(f"measuring the baseline with {_BASELINE.value} ...", flush=True)
        subprocess.run(
            [os.path.abspath(_BASELINE.value), os.path.abspath(__file__), *args, f"--json_out={out}"],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=tmp,
        )  # cwd: import the baseline's nurec_jax, not ours
        with open(out) as f:
            return {(r["camera"], r["size"]): r for r in json.load(f)}


def _main(argv):
    base = _baseline_rows(sys.argv) if _BASELINE.value else {}
    dev = jax.devices()[0]
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}")
    scene = nurec_jax.load_scene(nurec_jax.sample_scene_path())
    meta = scene.metadata
    print(f"scene {meta.scene_id}: {scene.gaussians.static.count + scene.gaussians.dynamic.count} Gaussians")

    def fig(row, key, fmt):
        text = format(row[key], fmt)
        b = base.get((row["camera"], row["size"]), {}).get(key)
        return text if b is None else f"{text} (base {format(b, fmt)}, {b / max(row[key], 1e-9):.1f}x)"

    rows = []
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
            n_gaussians = scene.gaussians.static.count + scene.gaussians.dynamic.count
            try:  # the bucket the Renderer renders with (older checkouts size it from the frame alone)
                opts = sizer.options_for(cam, ("b",), n_gaussians)
            except TypeError:
                opts = sizer.options_for(cam, ("b",))
            if int(first.num_pairs) > opts.pair_capacity:
                raise SystemExit(
                    f"{cam_id}: {int(first.num_pairs)} pairs overflow the timed bucket "
                    f"{opts.pair_capacity}: the figures would be of a clipped frame"
                )
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
            row = dict(
                camera=cam_id,
                model=cam.model,
                size=f"{cam.width}x{cam.height}",
                pairs=int(first.num_pairs),
                compile_s=compile_s,
                ms=1e3 * float(np.median(times)),
            )
            if _GRAD.value:

                def loss(d, cam=cam, pose=pose, actors=actors, opts=opts):
                    p = R.PosePair(pose.start.perturb(d), pose.end.perturb(d))
                    return jnp.mean(R.render(scene.gaussians, cam, p, actors, opts).rgb)

                g = jax.jit(jax.grad(loss))
                g(jnp.zeros(6)).block_until_ready()
                t0 = time.perf_counter()
                for _ in range(_REPEATS.value):
                    g(jnp.zeros(6)).block_until_ready()
                row["grad_ms"] = 1e3 * (time.perf_counter() - t0) / _REPEATS.value
            rows.append(row)
            line = (
                f"{cam_id:<28} {cam.model:<15} {row['size']:>9} pairs {row['pairs']:>7}  compile "
                f"{fig(row, 'compile_s', '.1f')} s  forward {fig(row, 'ms', '.0f')} ms"
            )
            if _GRAD.value:
                line += f"  fwd+bwd {fig(row, 'grad_ms', '.0f')} ms"
            print(line, flush=True)
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    app.run(_main)
