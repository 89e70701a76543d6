"""Gradients of the reference renderer against central finite differences (float64), NaN-freedom."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import render_fixtures as fx

from nurec_jax import render as R
from nurec_jax.metadata import ShutterType
from nurec_jax.poses import PosePair
from nurec_jax.types import Gaussians, SceneGaussians

_OPTS = R.RenderOptions(pair_capacity=1 << 10, chunk=4, tile_batch=2)


def _setup(model, shutter, seed=0):
    cam = fx.make_camera(model, shutter, width=16, height=16, dtype=jnp.float64)
    host = fx.random_scene(seed, n=8, n_actor=4, degree=1, wide=cam.wide_angle)
    host["opac"] = np.clip(host["opac"], 0.3, 0.8)  # away from the 0.99 clamp
    scene = fx.to_scene(host, np.float64)
    start, end = fx.camera_poses(0.3)
    pose = PosePair.from_matrices(jnp.asarray(start), jnp.asarray(end))
    actors = fx.actor_poses(host, np.float64)
    out = R.render(scene, cam, pose, actors, _OPTS)
    rng = np.random.default_rng(seed + 7)
    cot = [jnp.asarray(rng.normal(size=x.shape)) for x in (out.rgb, out.alpha, out.hit_distance)]
    assert float(out.alpha.max()) > 0.3

    def loss(scene, pose):
        o = R.render(scene, cam, pose, actors, _OPTS)
        return jnp.sum(o.rgb * cot[0]) + jnp.sum(o.alpha * cot[1]) + 0.1 * jnp.sum(o.hit_distance * cot[2])

    return scene, pose, loss


def _directional_check(f, x, rng, n_dirs=3, eps=1e-6, rtol=2e-4):
    # Compiled once each: eager evaluation of a render dispatches (and compiles) its loops op by op.
    g = jax.jit(jax.grad(f))(x)
    f = jax.jit(f)
    leaves_x, tree = jax.tree_util.tree_flatten(x)
    leaves_g = tree.flatten_up_to(g)
    assert all(np.all(np.isfinite(np.asarray(l))) for l in leaves_g)
    for _ in range(n_dirs):
        v = [jnp.asarray(rng.normal(size=np.shape(l))) for l in leaves_x]
        plus = tree.unflatten([a + eps * b for a, b in zip(leaves_x, v)])
        minus = tree.unflatten([a - eps * b for a, b in zip(leaves_x, v)])
        fd = (f(plus) - f(minus)) / (2 * eps)
        an = sum(jnp.sum(a * b) for a, b in zip(leaves_g, v))
        assert abs(fd - an) <= rtol * max(1.0, abs(fd)), (float(fd), float(an))


@pytest.mark.parametrize(
    "model,shutter",
    [
        ("pinhole", ShutterType.ROLLING_TOP_TO_BOTTOM),
        ("ftheta", ShutterType.GLOBAL),
        ("fisheye", ShutterType.ROLLING_LEFT_TO_RIGHT),
    ],
)
def test_pose_gradient_matches_finite_differences(model, shutter):
    with jax.enable_x64(True):
        scene, pose, loss = _setup(model, shutter)
        f = lambda d: loss(scene, PosePair(pose.start.perturb(d), pose.end.perturb(d)))  # noqa: E731
        _directional_check(f, jnp.zeros(6), np.random.default_rng(1))


_FIELDS = ("means", "quats", "scales", "opacities", "sh")


def test_gaussian_gradients_match_finite_differences():
    """Every Gaussian parameter, static and dynamic layers: one compiled gradient of all of them, then
    central differences along random directions that move one field at a time."""
    with jax.enable_x64(True):
        scene, pose, loss = _setup("ftheta", ShutterType.ROLLING_TOP_TO_BOTTOM, seed=3)

        def f(params):
            s = SceneGaussians(
                Gaussians(**{k: v[0] for k, v in params.items()}, sh_degree=scene.static.sh_degree),
                scene.static_layer,
                Gaussians(**{k: v[1] for k, v in params.items()}, sh_degree=scene.dynamic.sh_degree),
                scene.dynamic_track,
                scene.sky,
                scene.static_layer_names,
                scene.track_ids,
            )
            return loss(s, pose)

        x = {k: (getattr(scene.static, k), getattr(scene.dynamic, k)) for k in _FIELDS}
        g = jax.jit(jax.grad(f))(x)
        f = jax.jit(f)
        rng = np.random.default_rng(2)
        for field in _FIELDS:
            eps = 1e-5 if field == "quats" else 1e-6
            assert all(np.all(np.isfinite(np.asarray(a))) for a in g[field]), field
            for _ in range(3):
                v = tuple(jnp.asarray(rng.normal(size=np.shape(a))) for a in x[field])
                plus = {**x, field: tuple(a + eps * b for a, b in zip(x[field], v))}
                minus = {**x, field: tuple(a - eps * b for a, b in zip(x[field], v))}
                fd = (f(plus) - f(minus)) / (2 * eps)
                an = sum(jnp.sum(a * b) for a, b in zip(g[field], v))
                assert abs(fd - an) <= 2e-4 * max(1.0, abs(fd)), (field, float(fd), float(an))


@pytest.mark.parametrize("model", ["ftheta", "pinhole", "fisheye"])
def test_gradients_are_nan_free_float32(model):
    cam = fx.make_camera(model, ShutterType.ROLLING_TOP_TO_BOTTOM, width=16, height=16)
    host = fx.random_scene(5, n=10, n_actor=4, degree=2, wide=cam.wide_angle)
    host["means"][0] = [0.5, -0.3, 0.2]  # exactly at the camera centre
    scene = fx.to_scene(host)
    start, end = fx.camera_poses(0.0)  # start == end position: slerp of (nearly) equal rotations
    pose = PosePair.from_matrices(jnp.asarray(start, jnp.float32), jnp.asarray(start, jnp.float32))

    def loss(scene, d):
        o = R.render(scene, cam, PosePair(pose.start.perturb(d), pose.end.perturb(d)), fx.actor_poses(host), _OPTS)
        return jnp.sum(o.rgb) + jnp.sum(o.depth)

    gs, gd = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(scene, jnp.zeros(6))
    for leaf in jax.tree_util.tree_leaves((gs, gd)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf)))
    assert float(jnp.abs(gd).sum()) > 0
