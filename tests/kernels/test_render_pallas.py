"""The Pallas implementation behind the full camera renderer and the lidar ray caster, against the
reference implementation (interpret mode on CPU): images, gradients through the custom VJPs, lidar returns.

(The brute-force comparison in tests/test_render.py also renders half of its camera-model x shutter
grid with the Pallas implementation, against an independent float64 renderer.)"""

import dataclasses

import jax
import jax.numpy as jnp
import lidar_fixtures as lf
import numpy as np
import pytest
import render_fixtures as fx

from nurec_jax import lidar
from nurec_jax import render as R
from nurec_jax import renderer as RR
from nurec_jax.metadata import ShutterType
from nurec_jax.poses import PosePair

# One tile size for both (the backends' defaults differ, 16 vs 8): the same pairs, so the kernels are compared
# like for like.
_OPTS = R.RenderOptions(pair_capacity=1 << 13, chunk=8, tile_batch=4, tile_size=16)


def _both(fn):
    """fn(options) evaluated with both implementations in one compiled function."""
    return (
        fn(dataclasses.replace(_OPTS, implementation="reference")),
        fn(dataclasses.replace(_OPTS, implementation="pallas")),
    )


def _setup(model, shutter):
    cam = fx.make_camera(model, shutter)
    host = fx.random_scene(1, wide=cam.wide_angle)
    s, e = fx.camera_poses(0.6)
    return (
        cam,
        fx.to_scene(host),
        PosePair.from_matrices(s.astype(np.float32), e.astype(np.float32)),
        fx.actor_poses(host),
    )


@pytest.mark.parametrize(
    "model,shutter",
    [
        ("ftheta", ShutterType.ROLLING_TOP_TO_BOTTOM),
        ("pinhole", ShutterType.ROLLING_RIGHT_TO_LEFT),
        ("fisheye", ShutterType.GLOBAL),
    ],
)
def test_render_matches_reference(model, shutter):
    cam, scene, pose, actors = _setup(model, shutter)
    ref, pal = jax.jit(lambda g, p, a: _both(lambda o: R.render(g, cam, p, a, o)))(scene, pose, actors)
    assert float(ref.alpha.max()) > 0.5 and int(ref.num_pairs) <= _OPTS.pair_capacity
    for name in ("rgb", "alpha", "hit_distance", "depth"):
        np.testing.assert_allclose(
            np.asarray(getattr(pal, name)), np.asarray(getattr(ref, name)), atol=2e-4, rtol=5e-4, err_msg=name
        )


def test_pose_and_gaussian_gradients_match_reference():
    # A moving rolling-shutter FTheta camera with two moving actors: gradients reach the sensor pose
    # (through the rays) and every Gaussian parameter (through eval3d and the colours).
    cam, scene, pose, actors = _setup("ftheta", ShutterType.ROLLING_LEFT_TO_RIGHT)
    cot = jnp.asarray(np.random.default_rng(3).normal(size=(cam.height, cam.width, 3)), jnp.float32)

    def loss(d, o):
        static = dataclasses.replace(scene.static, means=d["means"], opacities=d["opacities"], sh=d["sh"])
        p = PosePair(dataclasses.replace(pose.start, trans=d["t0"]), dataclasses.replace(pose.end, trans=d["t1"]))
        out = R.render(dataclasses.replace(scene, static=static), cam, p, actors, o)
        return jnp.sum(out.rgb * cot) + jnp.sum(out.depth)

    diff = dict(
        means=scene.static.means,
        opacities=scene.static.opacities,
        sh=scene.static.sh,
        t0=pose.start.trans,
        t1=pose.end.trans,
    )
    g_ref, g_pal = jax.jit(lambda d: _both(lambda o: jax.grad(loss)(d, o)))(diff)
    for k in diff:
        a, b = np.asarray(g_ref[k]), np.asarray(g_pal[k])
        assert np.abs(a).max() > 0, k
        np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max(), err_msg=k)


def test_lidar_spin_matches_reference():
    model = lf.small_model(lf.WALL_BEAMS, columns=32)
    scene = lf.make_scene(lf.wall(8.0, ripple=0.4), normal_axis=0)
    pose = PosePair.from_matrices(lf.pose_at(0.2, 0.0), lf.pose_at(0.2, 0.5))
    spins = [
        RR.LidarCaster(lidar.LidarOptions(pair_capacity=1 << 14, implementation=impl)).cast(scene, model, pose)
        for impl in ("reference", "pallas")
    ]
    ref, pal = spins
    assert (ref.alpha > 0.5).mean() > 0.1  # the wall fills a sector of the spin
    # Thin discs (0.02 m) seen edge-on 8 m away: d^2 = |o_c|^2 - (o_c.d_c)^2/|d_c|^2 cancels terms of ~1e5 in
    # float32, so the two implementations' different (but equally valid) operation orders differ by ~1e-3
    # in alpha on a few grazing rays.
    np.testing.assert_allclose(pal.distance, ref.distance, atol=1e-3)
    np.testing.assert_allclose(pal.alpha, ref.alpha, atol=5e-3)
    assert np.abs(pal.alpha - ref.alpha).mean() < 1e-4
    np.testing.assert_allclose(pal.intensity, ref.intensity, atol=1e-4)
