import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nurec_jax import geometry, sh

quats = st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1)


@settings(max_examples=50, deadline=None)
@given(quats)
def test_quat_matrix_round_trip(q):
    q = geometry.normalize_quat(np.asarray(q))
    m = geometry.quat_wxyz_to_matrix(q)
    np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(m) > 0
    back = geometry.matrix_to_quat_wxyz(m)
    # q and -q are the same rotation.
    assert min(np.abs(back - q).max(), np.abs(back + q).max()) < 1e-9
    assert back[0] >= 0


@settings(max_examples=30, deadline=None)
@given(quats, quats)
def test_quat_product_is_matrix_product(a, b):
    a, b = geometry.normalize_quat(np.asarray(a)), geometry.normalize_quat(np.asarray(b))
    ab = geometry.quat_multiply_wxyz(a, b)
    np.testing.assert_allclose(
        geometry.quat_wxyz_to_matrix(ab), geometry.quat_wxyz_to_matrix(a) @ geometry.quat_wxyz_to_matrix(b), atol=1e-12
    )


def test_interpolate_poses_lerp_and_slerp():
    ts = np.array([0, 100])
    a = geometry.make_transform(np.eye(3), [0, 0, 0])
    rz = geometry.quat_wxyz_to_matrix(np.array([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)]))  # 90° yaw
    b = geometry.make_transform(rz, [10, 0, 2])
    mid = geometry.interpolate_poses(ts, np.stack([a, b]), 50)
    np.testing.assert_allclose(mid[:3, 3], [5, 0, 1])
    np.testing.assert_allclose(
        mid[:3, :3], geometry.quat_wxyz_to_matrix(np.array([np.cos(np.pi / 8), 0, 0, np.sin(np.pi / 8)])), atol=1e-12
    )
    np.testing.assert_allclose(geometry.interpolate_poses(ts, np.stack([a, b]), [-5, 500])[1], b)


def test_decompose_similarity():
    r = geometry.quat_wxyz_to_matrix(np.array([0.3, 0.2, -0.5, 0.7]))
    m = geometry.make_transform(r * 2.0, [1, 2, 3])
    m2 = m / 4.0  # NCore FrameConversion stores a projective weight in m[3, 3]
    q, s, t = geometry.decompose_similarity(m2)
    np.testing.assert_allclose(q, r, atol=1e-12)
    assert abs(s - 2.0) < 1e-12
    np.testing.assert_allclose(t, [1, 2, 3])


def test_sh_basis_is_orthonormal():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(400_000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    y = sh.sh_basis(d, 3)
    gram = 4 * np.pi * y.T @ y / len(d)  # Monte-Carlo integral over the sphere
    np.testing.assert_allclose(gram, np.eye(16), atol=0.03)


def test_one_quaternion_implementation_serves_numpy_and_jax():
    """nurec_jax.math's quaternion maths runs on numpy (float64, the loader) and jax.numpy (float32, the
    renderer) alike; both agree to float32 precision, and slerp stays exact between nearly equal
    quaternions in float64 (where float32 switches to nlerp)."""
    import jax.numpy as jnp

    from nurec_jax import math as nmath

    rng = np.random.default_rng(3)
    q = rng.normal(size=(16, 4))
    r = rng.normal(size=(16, 4))
    t = rng.uniform(size=16)
    for fn, args in (
        (nmath.quat_to_matrix, (q,)),
        (nmath.quat_multiply, (q, r)),
        (nmath.matrix_to_quat, (nmath.quat_to_matrix(q, xp=np),)),
        (nmath.slerp, (geometry.normalize_quat(q), geometry.normalize_quat(r), t)),
    ):
        host = fn(*args, xp=np)
        device = fn(*(jnp.asarray(a, jnp.float32) for a in args))
        assert host.dtype == np.float64
        np.testing.assert_allclose(np.asarray(device), host, atol=2e-6)
    # 1e-6 rad apart: float64 slerp is the exact rotation at t (nlerp would be off by ~1e-19 only here,
    # but the path must not divide by sin(omega) ~ 0 either).
    a = geometry.normalize_quat(np.array([1.0, 0.0, 0.0, 0.0]))
    b = np.array([np.cos(0.5e-6), 0.0, 0.0, np.sin(0.5e-6)])
    mid = geometry.slerp_wxyz(a, b, 0.5)
    np.testing.assert_allclose(mid, [np.cos(0.25e-6), 0.0, 0.0, np.sin(0.25e-6)], atol=1e-15)
    with pytest.raises(ValueError, match="zero norm"):
        geometry.quat_wxyz_to_matrix(np.zeros(4))
