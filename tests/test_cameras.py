"""Camera models: round trips over the whole field of view, polynomial consistency, scaling, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import render_fixtures as fx
from hypothesis import given, settings
from hypothesis import strategies as st

import nurec_jax
from nurec_jax import cameras
from nurec_jax.metadata import FThetaIntrinsics, PolynomialType, ShutterType


def _sample_cameras():
    meta = nurec_jax.read_scene_metadata(nurec_jax.sample_scene_path())
    out = {c.logical_id: cameras.camera_from_intrinsics(c.intrinsics) for c in meta.cameras.values()}
    for model in ("ftheta", "pinhole", "fisheye"):
        out[f"fixture_{model}"] = fx.make_camera(model)
    return out


CAMS = _sample_cameras()


@pytest.mark.parametrize("name", sorted(CAMS))
def test_unproject_project_round_trip_over_the_image(name):
    cam = CAMS[name]
    ys, xs = np.mgrid[0 : cam.height : max(1, cam.height // 23), 0 : cam.width : max(1, cam.width // 29)]
    uv = jnp.asarray(np.stack([xs + 0.5, ys + 0.5], -1).reshape(-1, 2), jnp.float32)
    ray = cam.unproject(uv)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ray), axis=-1), 1.0, atol=1e-5)
    uv2, valid = cam.project(ray * 7.5)
    valid = np.asarray(valid)
    assert valid.mean() > 0.85
    err = np.abs(np.asarray(uv2) - np.asarray(uv)).max(-1)[valid]
    assert err.max() < 2e-3, err.max()  # px, float32


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 2 * math.pi), st.floats(0.3, 80.0), st.sampled_from(sorted(CAMS)))
def test_project_unproject_gives_the_ray_of_the_point(frac, phi, dist, name):
    """For points inside the field of view, unproject(project(p)) is the unit ray toward p."""
    cam = CAMS[name]
    max_angle = float(getattr(cam, "max_angle", math.radians(60.0)))
    theta = frac * 0.98 * min(max_angle, math.radians(60.0) if cam.model == "opencv-pinhole" else max_angle)
    ray = np.array([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)])
    uv, valid = cam.project(jnp.asarray(ray * dist, jnp.float32))
    if not bool(valid):
        return
    back = np.asarray(cam.unproject(uv))
    np.testing.assert_allclose(back, ray, atol=2e-4)


def test_ftheta_forward_and_backward_polynomials_agree():
    for name, cam in CAMS.items():
        if cam.model != "ftheta":
            continue
        r = jnp.linspace(0.0, 0.95 * math.hypot(cam.width, cam.height) / 2, 200)
        theta = cam.angle_of_distance(r)
        np.testing.assert_allclose(np.asarray(cam.distance_of_angle(theta)), np.asarray(r), atol=1e-2, err_msg=name)
        # The fitted / given forward polynomial alone is close to the exact inverse.
        approx = np.polynomial.polynomial.polyval(np.asarray(theta, np.float64), np.asarray(cam.fw_poly, np.float64))
        assert np.abs(approx - np.asarray(r)).max() < 0.5, name


def test_ftheta_forward_reference_derives_backward():
    fw = (0.0, 900.0, -20.0, 5.0, 0.0, 0.0)
    intr = FThetaIntrinsics(
        (1920, 1080),
        ShutterType.GLOBAL,
        (959.5, 539.5),
        PolynomialType.ANGLE_TO_PIXELDIST,
        (),
        fw,
        1.2,
        (1.0, 0.0, 0.0),
    )
    cam = cameras.camera_from_intrinsics(intr)
    theta = jnp.linspace(0.0, 1.1, 50)
    np.testing.assert_allclose(
        np.asarray(cam.angle_of_distance(cam.distance_of_angle(theta))), np.asarray(theta), atol=1e-5
    )


def test_principal_point_and_on_axis_jacobian():
    for name, cam in CAMS.items():
        uv, valid = cam.project(jnp.array([0.0, 0.0, 5.0]))
        assert bool(valid)
        np.testing.assert_allclose(np.asarray(uv), np.asarray(cam.principal_point), atol=1e-4, err_msg=name)
        jac = np.asarray(jax.jacfwd(lambda p: cam.project(p)[0])(jnp.array([0.0, 0.0, 1.0])))
        assert np.all(np.isfinite(jac)) and abs(jac[0, 0]) > 1.0, name  # df/dx on the axis is the focal length


def test_nurec_ftheta_principal_point_convention():
    """NuRec FTheta principal points are pixel-centre based: the optical axis lands at (cx + 0.5, cy + 0.5)."""
    meta = nurec_jax.read_scene_metadata(nurec_jax.sample_scene_path())
    intr = meta.cameras["camera_front_wide_120fov"].intrinsics
    cam = cameras.camera_from_intrinsics(intr)
    uv, _ = cam.project(jnp.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(np.asarray(uv), np.asarray(intr.principal_point) + 0.5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CAMS))
def test_resolution_scaling_scales_image_points(name):
    cam = CAMS[name]
    small = cameras.camera_at_resolution(cam, cam.width // 2, 0)
    s = small.width / cam.width
    assert small.height == int(small.width / (cam.width / cam.height))
    p = jnp.array([[0.3, -0.2, 2.0], [-1.0, 0.4, 3.0], [0.0, 0.0, 1.0]])
    uv, _ = cam.project(p)
    uv_s, _ = small.project(p)
    np.testing.assert_allclose(np.asarray(uv_s), np.asarray(uv) * s, rtol=1e-4, atol=1e-3)


def test_output_resolution_rule_matches_nurec():
    table = [
        ((320, 512), (320, 567)),
        ((1080, 1900), (1080, 1916)),
        ((1080, 1920), (1081, 1920)),
        ((2160, 3456), (2160, 3833)),
        ((2168, 3848), (2168, 3848)),
        ((300, 1), (300, 532)),
    ]
    for (h, w), (oh, ow) in table:
        out_w, out_h, _ = cameras.output_resolution(3848, 2168, w, h)
        assert (out_h, out_w) == (oh, ow), (h, w)
    assert cameras.output_resolution(3848, 2168, 0, 0)[:2] == (3848, 2168)
