"""Lidar ray casting speed: rays per second and ms per spin for each lidar type on a scene.

    python tools/bench_lidar.py [--scene path.usdz] [--spins 2] [--ray-chunk-size N]
    python tools/bench_lidar.py --baseline-python ../base/.venv/bin/python   # also print ratios

With --baseline-python (a baseline checkout's venv interpreter, e.g. a `git worktree` of the previous
commit) the same spins are first timed there, in a child process on the same machine.

Times `nurec_jax.renderer.LidarCaster.cast` (the reference jnp path) after one warm-up spin per type
(compile + capacity growth), with the sensor on the scene's lidar mount (or 1.9 m above the rig).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from nurec_jax import data, lidar_models, load_scene
from nurec_jax import renderer as RR
from nurec_jax.poses import PosePair
from nurec_jax.renderer import track_actor_poses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scene", default=data.sample_scene_path())
    p.add_argument("--spins", type=int, default=2)
    p.add_argument("--ray-chunk-size", type=int, default=1 << 62)
    p.add_argument("--types", default="PANDAR128,AT128")
    p.add_argument("--baseline-python", default=None, help="also time a baseline checkout's venv; print ratios")
    p.add_argument("--json-out", default=None, help="also write the figures here")
    args = p.parse_args()
    base = {}
    if args.baseline_python:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "base.json")
            argv = [a for a in sys.argv[1:] if not a.startswith(("--baseline-python", "--json-out"))]
            if args.baseline_python in argv:
                argv.remove(args.baseline_python)
            print(f"timing the baseline with {args.baseline_python} ...", flush=True)
            subprocess.run(
                [os.path.abspath(args.baseline_python), os.path.abspath(__file__), *argv, f"--json-out={out}"],
                check=True,
                stdout=subprocess.DEVNULL,
                cwd=tmp,
            )
            with open(out) as f:
                base = json.load(f)
    rows = {}
    scene = load_scene(args.scene)
    meta = scene.metadata
    mount = next(iter(meta.lidars.values())).T_sensor_rig if meta.lidars else np.diag([1.0, 1, 1, 1])
    # The caster moved from nurec_jax.lidar to nurec_jax.renderer; either serves a baseline checkout.
    caster = getattr(RR, "LidarCaster", None) or __import__("nurec_jax.lidar", fromlist=["x"]).LidarCaster
    caster = caster()
    n = sum(int(x.means.shape[0]) for x in (scene.gaussians.static, scene.gaussians.dynamic))
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; scene {meta.scene_id} ({n} Gaussians)")
    ts = meta.trajectory.timestamps_us
    for name in args.types.split(","):
        model = lidar_models.DEVICES[name]()
        times = []
        for i in range(args.spins + 1):
            t0 = int(ts[10 + 20 * i])
            t1 = t0 + int(1e6 / model.spin_frequency_hz)
            pose = PosePair.from_matrices(
                *(np.asarray(meta.trajectory.pose_at(t) @ mount, np.float32) for t in (t0, t1))
            )
            actors = track_actor_poses(meta, scene.gaussians.track_ids, t0, t1)
            start = time.perf_counter()
            spin = caster.cast(scene.gaussians, model, pose, actors, ray_chunk_size=args.ray_chunk_size)
            times.append(time.perf_counter() - start)
            returns = int(np.sum(spin.alpha > 0.8))
        steady = float(np.median(times[1:]))
        rows[name] = dict(first_s=times[0], spin_ms=steady * 1e3)
        b = base.get(name)
        vs = (
            ""
            if b is None
            else (
                f" (base {b['spin_ms']:.0f} ms/spin, {b['spin_ms'] / (steady * 1e3):.1f}x; "
                f"first spin {b['first_s']:.1f} s)"
            )
        )
        print(
            f"{name:<10} {model.rays_per_spin:>7} rays/spin: first spin (compile) {times[0]:.1f} s, "
            f"{steady * 1e3:.0f} ms/spin, {model.rays_per_spin / steady:,.0f} rays/s, {returns} returns{vs}"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
