"""Host-side (numpy, float64) rigid-transform helpers used while loading scenes and validating requests.

The quaternion formulas are `nurec_jax.math`'s (one implementation for numpy and jax.numpy); this module
adds float64 inputs, refusal of zero-norm quaternions and the pose conversions the loader needs.

Conventions: quaternions are Hamilton; `wxyz` / `xyzw` in a name says the component order.
A 4x4 matrix `T_a_b` maps points of frame a into frame b: `p_b = T_a_b @ p_a` (column vectors).
"""

from __future__ import annotations

import numpy as np

from nurec_jax import math as nmath


def normalize_quat(q: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Normalises quaternions along the last axis; zero-norm inputs raise ValueError."""
    q = np.asarray(q, dtype=np.float64)
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(n < eps):
        raise ValueError("quaternion with (near) zero norm")
    return q / n


def xyzw_to_wxyz(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q)
    return np.concatenate([q[..., 3:4], q[..., :3]], axis=-1)


def wxyz_to_xyzw(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q)
    return np.concatenate([q[..., 1:4], q[..., 0:1]], axis=-1)


def quat_wxyz_to_matrix(q: np.ndarray) -> np.ndarray:
    """(..., 4) wxyz quaternions (zero-norm refused) -> (..., 3, 3) rotation matrices, float64."""
    return nmath.quat_to_matrix(normalize_quat(q), xp=np)


def matrix_to_quat_wxyz(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 4) unit wxyz quaternions with w >= 0, float64."""
    return nmath.matrix_to_quat(np.asarray(m, dtype=np.float64), xp=np)


def quat_multiply_wxyz(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a (x) b of wxyz quaternions (broadcasting), float64."""
    return nmath.quat_multiply(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), xp=np)


def slerp_wxyz(q0: np.ndarray, q1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Shortest-path spherical interpolation between wxyz quaternions (zero-norm refused), t in [0, 1]."""
    return nmath.slerp(normalize_quat(q0), normalize_quat(q1), np.asarray(t, dtype=np.float64), xp=np)


def make_transform(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation and (..., 3) translation -> (..., 4, 4) homogeneous transform."""
    rotation = np.asarray(rotation, dtype=np.float64)
    translation = np.asarray(translation, dtype=np.float64)
    batch = np.broadcast_shapes(rotation.shape[:-2], translation.shape[:-1])
    out = np.zeros((*batch, 4, 4))
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


def pose7_xyzw_to_matrix(pose: np.ndarray) -> np.ndarray:
    """(..., 7) [x, y, z, qx, qy, qz, qw] poses -> (..., 4, 4) transforms."""
    pose = np.asarray(pose, dtype=np.float64)
    return make_transform(quat_wxyz_to_matrix(xyzw_to_wxyz(pose[..., 3:7])), pose[..., :3])


def interpolate_poses(timestamps_us: np.ndarray, transforms: np.ndarray, t_us: np.ndarray | int | float) -> np.ndarray:
    """Interpolates rigid transforms sampled at `timestamps_us` (lerp translation, slerp rotation).

    Times outside the samples clamp to the first / last pose. Returns (..., 4, 4) for t_us of shape (...).
    """
    ts = np.asarray(timestamps_us, dtype=np.float64)
    transforms = np.asarray(transforms, dtype=np.float64)
    t = np.asarray(t_us, dtype=np.float64)
    if ts.ndim != 1 or ts.shape[0] != transforms.shape[0] or ts.shape[0] == 0:
        raise ValueError("timestamps and transforms must be non-empty and of equal length")
    if ts.shape[0] == 1:
        return np.broadcast_to(transforms[0], (*t.shape, 4, 4)).copy()
    idx = np.clip(np.searchsorted(ts, t, side="right") - 1, 0, ts.shape[0] - 2)
    t0, t1 = ts[idx], ts[idx + 1]
    alpha = np.clip((t - t0) / np.maximum(t1 - t0, 1e-9), 0.0, 1.0)
    q = matrix_to_quat_wxyz(transforms[:, :3, :3])
    rot = quat_wxyz_to_matrix(slerp_wxyz(q[idx], q[idx + 1], alpha))
    trans = (1.0 - alpha)[..., None] * transforms[idx, :3, 3] + alpha[..., None] * transforms[idx + 1, :3, 3]
    return make_transform(rot, trans)


def decompose_similarity(m: np.ndarray, tol: float = 1e-4) -> tuple[np.ndarray, float, np.ndarray]:
    """Splits a 4x4 homogeneous similarity into (orthogonal 3x3, uniform scale > 0, translation 3).

    The matrix may carry a projective weight in m[3, 3] (NCore FrameConversion `1/s`); it is divided out.
    The orthogonal part may be a reflection (determinant -1), as in 3DGRUT's axis-swap transforms.
    Raises ValueError when the matrix is not orthogonal times a uniform scale plus a translation.
    """
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"expected a finite 4x4 matrix, got shape {m.shape}")
    if np.any(np.abs(m[3, :3]) > 1e-9) or abs(m[3, 3]) < 1e-12:
        raise ValueError(f"last row must be [0, 0, 0, w] with w != 0, got {m[3].tolist()}")
    a = m[:3, :3] / m[3, 3]
    t = m[:3, 3] / m[3, 3]
    det = float(np.linalg.det(a))
    if abs(det) < 1e-12:
        raise ValueError("transform is degenerate (determinant 0)")
    scale = float(np.cbrt(abs(det)))
    r = a / scale
    if not np.allclose(r @ r.T, np.eye(3), atol=tol):
        raise ValueError("transform is not a rotation with uniform scale")
    return r, scale, t
