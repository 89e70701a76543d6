"""Lidar ray casting against analytic scenes, the camera renderer, finite differences, and itself."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lidar_fixtures import WALL_BEAMS, ground, make_scene, pose_at, small_model, wall

from nurec_jax import cameras, lidar, lidar_models, sh
from nurec_jax import renderer as RR
from nurec_jax.metadata import OpenCVPinholeIntrinsics, ShutterType
from nurec_jax.poses import PosePair
from nurec_jax.render import RenderOptions, render
from nurec_jax.types import Gaussians, SceneGaussians


@pytest.fixture(scope="module")
def caster():
    return RR.LidarCaster(lidar.LidarOptions(pair_capacity=1 << 16))


def test_ground_plane_ranges_per_beam(caster):
    elev = np.linspace(-8.0, -40.0, 16)
    model = small_model(elev)
    scene = make_scene(ground(), normal_axis=2, intensity=0.4)
    spin = caster.cast(scene, model, PosePair.from_matrices(pose_at(2.0)))
    expected = 2.0 / np.sin(np.radians(-elev))
    assert np.all(spin.alpha > 0.9)
    np.testing.assert_allclose(spin.distance, np.broadcast_to(expected[:, None], spin.distance.shape), rtol=0.01)
    pts, inten, rings = spin.returns(model, 0.8)
    assert len(pts) == 16 * 64
    np.testing.assert_allclose(pts[:, 2], -2.0, atol=0.03)  # on the ground, 2 m below the sensor
    np.testing.assert_allclose(inten, 0.4, atol=1e-4)
    assert sorted(set(rings.tolist())) == list(range(16))


def test_wall_returns_at_its_distance_and_sky_returns_nothing(caster):
    elev = WALL_BEAMS  # the upper beams see only sky
    model = small_model(elev)
    scene = make_scene(wall(8.0), normal_axis=0)
    spin = caster.cast(scene, model, PosePair.from_matrices(pose_at()))
    pts, _, rings = spin.returns(model, 0.8)
    assert len(pts) > 20
    np.testing.assert_allclose(pts[:, 0], 8.0, atol=0.03)
    # The wall spans elevations up to atan(3 / 8) = 20.6 deg: beams above never return.
    top = np.nonzero(np.radians(elev) > math.atan2(3.0, 8.0) + 0.02)[0]
    assert len(top) >= 5 and not np.isin(rings, top).any()
    assert np.all(spin.alpha[top] < 1e-3)
    # Rays pointing backwards see nothing either.
    az = model.column_azimuths_rad
    back = np.abs(np.angle(np.exp(1j * az))) > math.radians(120)
    assert np.all(spin.alpha[:, back] < 1e-3)


def test_moving_sensor_shows_skew(caster):
    elev = np.linspace(-12.0, -40.0, 16)  # every beam meets the ground within the disc grid
    model = small_model(elev)
    scene = make_scene(ground(), normal_axis=2)
    rising = PosePair.from_matrices(pose_at(2.0), pose_at(3.0))  # up by 1 m during the spin
    spin = caster.cast(scene, model, rising)
    tau = np.arange(64) / 63.0
    expected = (2.0 + tau)[None, :] / np.sin(np.radians(-elev))[:, None]
    np.testing.assert_allclose(spin.distance, expected, rtol=0.015)
    assert np.all(spin.distance[:, -1] > 1.4 * spin.distance[:, 0])  # first vs last column of the spin
    # In the end-of-spin frame the ground is 3 m below the sensor for every column.
    pts, _, _ = spin.returns(model, 0.8)
    np.testing.assert_allclose(pts[:, 2], -3.0, atol=0.04)


def test_passes_match_one_pass(caster):
    model = small_model(WALL_BEAMS)
    scene = make_scene(wall(8.0, ripple=0.4), normal_axis=0)
    pose = PosePair.from_matrices(pose_at(0.2, 0.0), pose_at(0.2, 0.5))
    one = caster.cast(scene, model, pose)
    many = caster.cast(scene, model, pose, ray_chunk_size=16 * 16 * 2)  # 2 column tiles per pass
    np.testing.assert_allclose(many.distance, one.distance, atol=1e-5)
    np.testing.assert_allclose(many.points, one.points, atol=1e-4)


def test_depth_agrees_with_the_camera_renderer(caster):
    scene = make_scene(wall(8.0, ripple=0.2), normal_axis=0)
    model = small_model(WALL_BEAMS)
    spin = caster.cast(scene, model, PosePair.from_matrices(pose_at()))
    # A pinhole camera at the same place looking down +x (camera z), x_c = -y_w, y_c = -z_w.
    intr = OpenCVPinholeIntrinsics(
        (96, 64), ShutterType.GLOBAL, (48.0, 32.0), (40.0, 40.0), (0.0,) * 6, (0.0,) * 2, (0.0,) * 4
    )
    cam = cameras.camera_from_intrinsics(intr)
    c2w = np.eye(4, dtype=np.float32)
    c2w[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], np.float32)
    out = render(scene, cam, PosePair.from_matrices(c2w), None, RenderOptions(pair_capacity=1 << 16))
    depth = np.asarray(out.depth)
    e, b = np.broadcast_arrays(model.elevations_rad[:, None], model.column_azimuths_rad[None, :])
    d_w = np.stack([np.cos(b) * np.cos(e), np.sin(b) * np.cos(e), np.sin(e)], -1)
    d_c = d_w @ c2w[:3, :3]  # world -> camera (rotation transpose)
    uv = np.asarray(cam.project(jnp.asarray(d_c.reshape(-1, 3), jnp.float32))[0]).reshape(16, 64, 2)
    inside = (
        (uv[..., 0] > 2)
        & (uv[..., 0] < 94)
        & (uv[..., 1] > 2)
        & (uv[..., 1] < 62)
        & (spin.alpha > 0.9)
        & (d_c[..., 2] > 0.1)
    )
    assert inside.sum() > 60
    # Bilinear lookup of the camera's depth at the lidar ray's projection (pixel centres at +0.5).
    u, v = uv[..., 0][inside] - 0.5, uv[..., 1][inside] - 0.5
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - u0, v - v0
    cam_d = (
        depth[v0, u0] * (1 - fu) * (1 - fv)
        + depth[v0, u0 + 1] * fu * (1 - fv)
        + depth[v0 + 1, u0] * (1 - fu) * fv
        + depth[v0 + 1, u0 + 1] * fu * fv
    )
    a = np.asarray(out.alpha)
    solid = np.minimum.reduce([a[v0, u0], a[v0, u0 + 1], a[v0 + 1, u0], a[v0 + 1, u0 + 1]]) > 0.95
    assert solid.sum() > 50
    rel = (np.abs(spin.distance[inside] - cam_d) / cam_d)[solid]
    # Same Gaussians, same directions. On a flat wall they agree to 0.05 %; on this rippled one the
    # camera blends overlapping discs in optical-axis (z) order and the lidar in distance order, which
    # moves oblique rays by up to ~1 %.
    assert np.median(rel) < 0.003 and rel.max() < 0.015, (np.median(rel), rel.max())


def test_range_gradient_matches_finite_differences():
    model = small_model(np.linspace(10.0, -10.0, 16), columns=32, full=False)
    with jax.enable_x64(True):
        scene = make_scene(wall(8.0, ripple=0.5), normal_axis=0, dtype=np.float64)
        tables = lidar.lidar_tables(model, jnp.float64)
        base = PosePair.from_matrices(pose_at(0.1, 0.0, np.float64), pose_at(0.1, 0.3, np.float64))
        opts = lidar.LidarOptions(pair_capacity=1 << 15)
        actors = lidar.ActorPoses.hidden(0, jnp.float64)
        mask = np.asarray(lidar.raycast_pass(scene, tables, base, actors, jnp.int32(0), 2, opts).alpha) > 0.9
        assert mask.sum() > 50
        w = jnp.asarray(mask * np.random.default_rng(0).uniform(0.5, 1.5, mask.shape))

        def loss(delta):
            pose = PosePair(base.start.perturb(delta), base.end.perturb(delta))
            out = lidar.raycast_pass(scene, tables, pose, actors, jnp.int32(0), 2, opts)
            return jnp.sum(w * out.distance)

        grad = np.asarray(jax.jit(jax.grad(loss))(jnp.zeros(6)))
        f = jax.jit(loss)
        # Small steps: a larger one lets Gaussians cross the response / alpha cut-offs, which FD sees as jumps.
        eps = 1e-6
        fd = np.array([(f(jnp.eye(6)[i] * eps) - f(-jnp.eye(6)[i] * eps)) / (2 * eps) for i in range(6)])
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, fd, rtol=1e-2, atol=2e-3 * np.abs(fd).max())
    assert abs(grad[0]) > 1.0  # moving along the wall normal changes the ranges


def test_device_models():
    p, a = lidar_models.pandar128(), lidar_models.at128()
    assert (p.rows, p.columns, p.rays_per_spin, p.full_circle) == (128, 3600, 460800, True)
    assert (a.rows, a.columns, a.rays_per_spin, a.full_circle) == (128, 1200, 153600, False)
    np.testing.assert_allclose(np.degrees(p.elevations_rad[[0, -1]]), [14.44, -25.02])
    np.testing.assert_allclose(np.degrees(a.elevations_rad[[0, -1]]), [12.9, -12.5])
    with pytest.raises(ValueError, match="uniform step"):
        lidar_models.LidarModel("bad", np.zeros(2), np.zeros(2), np.array([0.0, 0.1, 0.5]))
    with pytest.raises(ValueError, match="missing parameter 'column_azimuths_rad'"):
        lidar_models.from_parameters("x", {"row_elevations_rad": [0.0]})


def test_fallback_intensity_is_colour_luminance():
    scene = make_scene(ground(half=1.0), normal_axis=2)
    g = scene.static
    sh_dc = np.zeros((g.count, 1, 3))
    sh_dc[:, 0] = (np.array([0.8, 0.4, 0.2]) - 0.5) / sh.C0
    scene = SceneGaussians(
        Gaussians(g.means, g.quats, g.scales, g.opacities, jnp.asarray(sh_dc, jnp.float32), 0),
        scene.static_layer,
        scene.dynamic,
        scene.dynamic_track,
        scene.sky,
        scene.static_layer_names,
        (),
        None,
        None,
    )
    np.testing.assert_allclose(
        np.asarray(lidar.gaussian_intensity(scene)), 0.2126 * 0.8 + 0.7152 * 0.4 + 0.0722 * 0.2, rtol=1e-5
    )


def test_moving_actor_is_posed_at_each_rays_time(caster):
    """A wall that is an actor moving from x = 8 to x = 10 during the spin: each column sees it where it
    is at that column's time, while a static sensor stays put."""
    base = make_scene(ground(half=1.0), normal_axis=2)  # a few static Gaussians under the sensor
    w = wall(0.0)  # cuboid-local: the wall plane through the actor's origin
    n = len(w)
    c = lambda x: jnp.asarray(np.asarray(x, np.float32))  # noqa: E731
    scales = np.full((n, 3), 0.25)
    scales[:, 0] = 0.02
    dyn = Gaussians(c(w), c(np.tile([1.0, 0, 0, 0], (n, 1))), c(scales), c(np.full(n, 0.95)), c(np.zeros((n, 1, 3))), 0)
    scene = SceneGaussians(
        base.static,
        base.static_layer,
        dyn,
        jnp.zeros(n, jnp.int32),
        base.sky,
        ("static",),
        ("truck",),
        static_intensity=base.static_intensity,
        dynamic_intensity=c(np.full(n, 0.7)),
    )
    actors = lidar.ActorPoses(
        PosePair.from_matrices(pose_at(0.0, 8.0)[None], pose_at(0.0, 10.0)[None]), jnp.ones(1, bool)
    )
    model = small_model(WALL_BEAMS)
    spin = caster.cast(scene, model, PosePair.from_matrices(pose_at(1.0)), actors)
    tau = np.arange(64) / 63.0
    e, b = np.broadcast_arrays(model.elevations_rad[:, None], model.column_azimuths_rad[None, :])
    dir_x = np.cos(b) * np.cos(e)
    hit = (spin.alpha > 0.9) & (dir_x > 0.5) & (np.abs(e) < 0.2)
    assert hit.sum() > 10
    x_world = (spin.distance * dir_x)[hit]
    expected = (8.0 + 2.0 * tau)[None, :].repeat(16, 0)[hit]
    np.testing.assert_allclose(x_world, expected, atol=0.05)
    assert np.ptp(x_world) > 0.3  # the columns that see it span a visible part of its motion
    np.testing.assert_allclose(spin.intensity[hit], 0.7, atol=1e-3)


@pytest.mark.parametrize("full", [True, False])
def test_tight_motion_bound_matches_the_whole_spin_bound(full):
    """Binning bounds a Gaussian's motion only over the columns that see it ("tight"); under fast motion
    and turning, every ray equals the whole-spin bound's, with far fewer pairs (and near the seam of a
    full circle, where the far columns see the Gaussian a spin later, it falls back)."""
    scene = make_scene(np.concatenate([ground(half=12.0, step=0.5), wall(x=6.0, step=0.4), wall(x=-7.0, step=0.4)]), 2)
    model = small_model(np.linspace(10, -25, 16), columns=720, full=full)
    yaw = 0.3
    end = pose_at(1.6, x=3.0)
    end[:3, :3] = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    pose = PosePair.from_matrices(pose_at(1.6), end.astype(np.float32))
    spins, pairs = {}, {}
    for bound in ("tight", "spin"):
        opts = lidar.LidarOptions(pair_capacity=1 << 18, motion_bound=bound)
        spins[bound] = RR.LidarCaster(opts).cast(scene, model, pose)
        tables = lidar.lidar_tables(model)
        out = jax.jit(lidar.raycast_pass, static_argnames=("n_col_tiles", "options"))(
            scene, tables, pose, lidar.ActorPoses.hidden(0), jnp.int32(0), n_col_tiles=tables.column_tiles, options=opts
        )
        pairs[bound] = int(out.num_pairs)
    a, b = spins["tight"], spins["spin"]
    assert np.sum(b.alpha > 0.8) > 1000
    np.testing.assert_allclose(a.alpha, b.alpha, atol=1e-6)
    np.testing.assert_allclose(a.distance, b.distance, atol=1e-4)
    # A full circle sweeps 360 degrees per spin, so each Gaussian sees a small part of the motion; an
    # 80-degree scanner sees more of it and more Gaussians keep the whole-spin bound.
    assert pairs["tight"] < (0.7 if full else 0.95) * pairs["spin"], pairs


def test_unknown_motion_bound_is_refused():
    scene = make_scene(wall(x=6.0, step=1.0), 0)
    tables = lidar.lidar_tables(small_model(np.linspace(5, -5, 8), columns=16))
    with pytest.raises(ValueError, match="motion_bound must be 'tight' or 'spin', got 'loose'"):
        lidar.raycast_pass(
            scene,
            tables,
            PosePair.from_matrices(pose_at(1.0)),
            lidar.ActorPoses.hidden(0),
            jnp.int32(0),
            tables.column_tiles,
            lidar.LidarOptions(motion_bound="loose"),
        )
