"""Camera pose refinement by gradient descent through the differentiable renderer.

Renders a target view of the sample scene at a recorded camera pose, perturbs the pose, and
recovers it by minimising the photometric error with Adam (optax), taking `jax.grad` through the
renderer with respect to a 6-DoF pose correction. Prints the pose error before and after.

    python tools/refine_pose.py --camera=camera_front_wide_120fov --width=128 --steps=150
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import nurec_jax
from nurec_jax import cameras
from nurec_jax import render as R
from nurec_jax import renderer as RR
from nurec_jax.poses import Pose, PosePair
from nurec_jax.types import SceneGaussians

_CAMERA = flags.DEFINE_string("camera", "camera_front_wide_120fov", "Camera logical id of the sample scene.")
_WIDTH = flags.DEFINE_integer("width", 128, "Render width (height follows the camera's aspect).")
_FRAME = flags.DEFINE_integer("frame", 20, "Recorded frame index of the camera.")
_STEPS = flags.DEFINE_integer("steps", 150, "Adam steps.")
_LR = flags.DEFINE_float("lr", 0.01, "Adam learning rate.")
_MAX_DISTANCE = flags.DEFINE_float("max_distance", 60.0, "Keep Gaussians within this distance (speed).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the perturbation direction.")


def crop_scene(g: SceneGaussians, centre: np.ndarray, radius: float) -> SceneGaussians:
    """Static Gaussians within `radius` of `centre` (actors kept)."""
    keep = np.flatnonzero(np.linalg.norm(np.asarray(g.static.means) - centre, axis=1) < radius)
    return dataclasses.replace(g, static=g.static.take(keep), static_layer=g.static_layer[keep])


def pose_error(a: Pose, b: Pose) -> tuple[float, float]:
    """(translation error in metres, rotation error in degrees)."""
    from nurec_jax import geometry

    dt = float(np.linalg.norm(np.asarray(a.trans, np.float64) - np.asarray(b.trans, np.float64)))
    qa = geometry.normalize_quat(np.asarray(a.quat, np.float64))
    qb = geometry.normalize_quat(np.asarray(b.quat, np.float64))
    rel = geometry.quat_multiply_wxyz(qa * [1, -1, -1, -1], qb)  # qa^-1 qb, precise for small angles
    return dt, float(np.degrees(2 * np.arctan2(np.linalg.norm(rel[1:]), abs(rel[0]))))


def refine(
    gaussians, camera, target_rgb, init: PosePair, steps: int, lr: float, options: R.RenderOptions, log_every: int = 0
):
    """Finds the 6-vector correction d (translation, rotation vector; applied on the right of both
    exposure poses) minimising the mean squared error to `target_rgb`. Returns (pose, losses)."""

    def loss_fn(d):
        pose = PosePair(init.start.perturb(d), init.end.perturb(d))
        out = R.render(gaussians, camera, pose, None, options)
        return jnp.mean((out.rgb - target_rgb) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
    d = jnp.zeros(6, init.start.trans.dtype)
    state = opt.init(d)
    losses = []
    for i in range(steps):
        loss, g = value_and_grad(d)
        updates, state = opt.update(g, state)
        d = optax.apply_updates(d, updates)
        losses.append(float(loss))
        if log_every and i % log_every == 0:
            print(f"step {i:4d}  loss {float(loss):.6f}")
    return PosePair(init.start.perturb(d), init.end.perturb(d)), losses


def setup(camera_id: str, width: int, frame: int, max_distance: float, seed: int):
    scene = nurec_jax.load_scene(nurec_jax.sample_scene_path())
    meta = scene.metadata
    cal = meta.cameras[camera_id]
    cam = cameras.camera_at_resolution(cameras.camera_from_intrinsics(cal.intrinsics), width, 0)
    s_us, e_us = (int(t) for t in cal.frame_timestamps_us[frame])
    truth = RR.rig_camera_poses(meta, camera_id, s_us, e_us)
    g = crop_scene(scene.gaussians, np.asarray(truth.start.trans), max_distance)
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=6)
    direction /= np.linalg.norm(direction)
    # About 0.2 m and 1.2 degrees off.
    delta = jnp.asarray(np.concatenate([direction[:3] * 0.2, direction[3:] * np.radians(1.2)]), jnp.float32)
    init = PosePair(truth.start.perturb(delta), truth.end.perturb(delta))
    return g, cam, truth, init


def _main(argv):
    del argv
    g, cam, truth, init = setup(_CAMERA.value, _WIDTH.value, _FRAME.value, _MAX_DISTANCE.value, _SEED.value)
    renderer = RR.Renderer()
    target = renderer.render(g, cam, truth, cache_key=("t",))  # also finds the capacities the view needs
    options = renderer.options_for(cam, ("t",))
    t0, r0 = pose_error(init.start, truth.start)
    print(f"{cam.width}x{cam.height} {_CAMERA.value}; initial error {t0:.4f} m, {r0:.3f} deg")
    start = time.perf_counter()
    pose, losses = refine(g, cam, target.rgb, init, _STEPS.value, _LR.value, options, log_every=25)
    t1, r1 = pose_error(pose.start, truth.start)
    print(
        f"after {_STEPS.value} steps ({time.perf_counter() - start:.1f} s): error {t1:.4f} m, {r1:.3f} deg "
        f"(translation {t0 / max(t1, 1e-9):.1f}x smaller, rotation {r0 / max(r1, 1e-9):.1f}x smaller); "
        f"loss {losses[0]:.5f} -> {losses[-1]:.5f}"
    )


if __name__ == "__main__":
    app.run(_main)
