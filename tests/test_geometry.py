import numpy as np
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
    np.testing.assert_allclose(geometry.quat_wxyz_to_matrix(ab),
                               geometry.quat_wxyz_to_matrix(a) @ geometry.quat_wxyz_to_matrix(b), atol=1e-12)


def test_interpolate_poses_lerp_and_slerp():
    ts = np.array([0, 100])
    a = geometry.make_transform(np.eye(3), [0, 0, 0])
    rz = geometry.quat_wxyz_to_matrix(np.array([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)]))  # 90° yaw
    b = geometry.make_transform(rz, [10, 0, 2])
    mid = geometry.interpolate_poses(ts, np.stack([a, b]), 50)
    np.testing.assert_allclose(mid[:3, 3], [5, 0, 1])
    np.testing.assert_allclose(mid[:3, :3], geometry.quat_wxyz_to_matrix(
        np.array([np.cos(np.pi / 8), 0, 0, np.sin(np.pi / 8)])), atol=1e-12)
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
