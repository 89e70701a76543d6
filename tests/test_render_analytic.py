"""Analytic checks of the renderer: where and how large a Gaussian renders, actors, rolling-shutter skew."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import render_fixtures as fx

from nurec_jax import cameras
from nurec_jax import constants as C
from nurec_jax import render as R
from nurec_jax import renderer as RR
from nurec_jax.metadata import FThetaIntrinsics, PolynomialType, ShutterType
from nurec_jax.poses import PosePair

_OPTS = R.RenderOptions(pair_capacity=1 << 12, chunk=8, tile_batch=4)
_render = jax.jit(R.render, static_argnames=("options",))


def _expected_alpha(theta, z, sigma, opacity):
    d2 = (z * np.sin(theta) / sigma) ** 2
    resp = np.exp(-0.5 * d2)
    a = np.minimum(C.MAX_ALPHA, opacity * resp)
    return np.where((resp > C.MIN_KERNEL_RESPONSE) & (a > C.ALPHA_THRESHOLD), a, 0.0)


def test_isotropic_gaussian_on_axis_pinhole():
    z, sigma, op, f = 5.0, 0.2, 0.9, 40.0
    cam = fx.square_pinhole(f=f)
    out = _render(fx.analytic_scene([[0, 0, z]], [[sigma] * 3], [op]), cam, fx.identity_pose(), None, options=_OPTS)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    theta = np.arctan(np.hypot(xs - 32, ys - 32) / f)
    want = _expected_alpha(theta, z, sigma, op)
    np.testing.assert_allclose(np.asarray(out.alpha), want, atol=5e-5)  # float32 rendering
    # Half-maximum radius: f * sigma * sqrt(2 ln 2) / z pixels.
    alpha = np.asarray(out.alpha)
    row = alpha[32, 32:]
    r_half = np.interp(0.5 * op, row[::-1], (np.arange(32) + 0.5)[::-1])
    assert abs(r_half - f * sigma * np.sqrt(2 * np.log(2)) / z) < 0.05
    np.testing.assert_allclose(np.asarray(out.depth)[32, 32], z - 0.0, atol=0.02)


def test_isotropic_gaussian_on_axis_ftheta():
    bw = (0.0, 0.02, 2e-5, -1e-7, 0.0, 0.0)
    intr = FThetaIntrinsics(
        (64, 48), ShutterType.GLOBAL, (31.5, 23.5), PolynomialType.PIXELDIST_TO_ANGLE, bw, (), 1.3, (1.0, 0.0, 0.0)
    )
    cam = cameras.camera_from_intrinsics(intr)
    z, sigma, op = 4.0, 0.25, 0.8
    out = _render(fx.analytic_scene([[0, 0, z]], [[sigma] * 3], [op]), cam, fx.identity_pose(), None, options=_OPTS)
    ys, xs = np.mgrid[0:48, 0:64] + 0.5
    r = np.hypot(xs - 32.0, ys - 24.0)  # principal point 31.5 + 0.5 (pixel-centre convention)
    theta = np.polynomial.polynomial.polyval(r, bw)
    np.testing.assert_allclose(np.asarray(out.alpha), _expected_alpha(theta, z, sigma, op), atol=5e-5)
    rgb = np.asarray(out.rgb)[24, 32]
    np.testing.assert_allclose(
        rgb, np.array([1.0, 0.5, 0.25]) * _expected_alpha(theta[24, 32], z, sigma, op), atol=1e-4
    )


def test_moving_actor_renders_where_its_pose_puts_it():
    cam = fx.square_pinhole()
    scene = fx.analytic_scene(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), actor=0.15)
    for target in ([0.8, -0.5, 6.0], [-1.0, 0.6, 4.0]):
        T = np.eye(4, dtype=np.float32)
        T[:3, 3] = target
        actors = R.ActorPoses(PosePair.from_matrices(T[None]), jnp.array([True]))
        alpha = np.asarray(_render(scene, cam, fx.identity_pose(), actors, options=_OPTS).alpha)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        centroid = np.array([np.sum(xs * alpha), np.sum(ys * alpha)]) / alpha.sum()
        want = 32 + 40.0 * np.array(target[:2]) / target[2]
        np.testing.assert_allclose(centroid, want, atol=0.15)
    hidden = R.ActorPoses(PosePair.from_matrices(T[None]), jnp.array([False]))
    assert float(_render(scene, cam, fx.identity_pose(), hidden, options=_OPTS).alpha.max()) == 0.0


def test_actor_poses_must_match_the_scene_tracks():
    scene = fx.analytic_scene(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), actor=0.15)  # one track
    with pytest.raises(ValueError, match=r"actors holds 2 poses but the scene has 1 actor tracks"):
        R.render(scene, fx.square_pinhole(), fx.identity_pose(), R.ActorPoses.hidden(2), _OPTS)


def _pole_columns(shutter, motion=0.5, z=5.0):
    cam = fx.square_pinhole(shutter)
    ys = np.linspace(-3.5, 3.5, 71)
    means = np.stack([np.zeros_like(ys), ys, np.full_like(ys, z)], -1)
    scene = fx.analytic_scene(means, np.full((len(ys), 3), 0.05), np.full(len(ys), 0.9))
    end = np.eye(4, dtype=np.float32)
    end[0, 3] = motion  # the camera moves right (camera +x) during the exposure
    out = _render(scene, cam, PosePair.from_matrices(np.eye(4, dtype=np.float32), end), None, options=_OPTS)
    alpha = np.asarray(out.alpha)
    xs = np.arange(64) + 0.5
    return np.sum(alpha * xs, 1) / np.maximum(alpha.sum(1), 1e-9), alpha.sum(1) > 0.5


def test_rolling_shutter_skews_a_pole_and_global_does_not():
    rows = np.arange(64)
    col, ok = _pole_columns(ShutterType.ROLLING_TOP_TO_BOTTOM)
    slope = np.polyfit(rows[ok], col[ok], 1)[0]
    # Row i is exposed at tau = i / 63 with the camera shifted by 0.5 * tau: u = 32 - 40 * 0.5 * tau / 5.
    np.testing.assert_allclose(slope, -40 * 0.5 / 5 / 63, rtol=0.03)
    col_g, ok_g = _pole_columns(ShutterType.GLOBAL)
    assert np.abs(col_g[ok_g] - 32.0).max() < 0.05


def test_renderer_grows_capacity_and_caches_compiles():
    cam = fx.square_pinhole(size=48)
    rng = np.random.default_rng(0)
    n = 300
    means = np.stack([rng.uniform(-2, 2, n), rng.uniform(-2, 2, n), rng.uniform(3, 8, n)], -1)
    scene = fx.analytic_scene(means, rng.uniform(0.05, 0.5, (n, 3)), rng.uniform(0.2, 0.9, n))
    small = R.RenderOptions(pair_capacity=64, chunk=8, tile_batch=4)
    direct = _render(scene, cam, fx.identity_pose(), None, options=small)
    assert int(direct.num_pairs) > 64  # overflow is reported, never hidden
    renderer = RR.Renderer(small)
    out = renderer.render(scene, cam, fx.identity_pose(), cache_key=("t",))
    big = _render(
        scene, cam, fx.identity_pose(), None, options=R.RenderOptions(pair_capacity=1 << 14, chunk=8, tile_batch=4)
    )
    np.testing.assert_allclose(np.asarray(out.rgb), np.asarray(big.rgb), atol=1e-6)
    traces = renderer.trace_count
    renderer.render(scene, cam, fx.identity_pose(), cache_key=("t",))
    assert renderer.trace_count == traces  # the grown bucket is remembered: no retrace, no retry


def test_staged_render_matches_and_times_each_stage():
    # DETAILS timing renders through four separately compiled stages; the frame must be the same.
    from nurec_jax.server.stage_timer import StageTimer

    cam = fx.square_pinhole(size=32)
    rng = np.random.default_rng(1)
    n = 40
    means = np.stack([rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), rng.uniform(3, 6, n)], -1)
    scene = fx.analytic_scene(means, rng.uniform(0.1, 0.4, (n, 3)), rng.uniform(0.3, 0.9, n))
    r = RR.Renderer(R.RenderOptions(pair_capacity=1 << 10, chunk=8, tile_batch=4))
    timer = StageTimer(synchronize=True)
    staged = r.render(scene, cam, fx.identity_pose(), timer=timer)
    plain = r.render(scene, cam, fx.identity_pose())
    assert list(timer.record()) == ["projection", "binning", "compositing", "compose"]
    assert all(ms > 0 for ms in timer.record().values())
    for name in ("rgb", "alpha", "depth"):
        np.testing.assert_allclose(np.asarray(getattr(staged, name)), np.asarray(getattr(plain, name)), atol=1e-6)
    assert float(plain.alpha.max()) > 0.5
