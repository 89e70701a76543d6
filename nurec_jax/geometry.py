"""Host-side (numpy, float64) rigid-transform helpers used while loading scenes.

Conventions: quaternions are Hamilton; `wxyz` / `xyzw` in a name says the component order.
A 4x4 matrix `T_a_b` maps points of frame a into frame b: `p_b = T_a_b @ p_a` (column vectors).
"""

from __future__ import annotations

import numpy as np


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
    """(..., 4) wxyz quaternions (normalised here) -> (..., 3, 3) rotation matrices."""
    w, x, y, z = np.moveaxis(normalize_quat(q), -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )


def matrix_to_quat_wxyz(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 4) unit wxyz quaternions with w >= 0 (vectorised)."""
    m = np.asarray(m, dtype=np.float64)
    r = lambda i, j: m[..., i, j]  # noqa: E731
    # Shepperd's method: pick the largest of the four |q_i| candidates for numerical stability.
    cand = np.stack(
        [
            1.0 + r(0, 0) + r(1, 1) + r(2, 2),
            1.0 + r(0, 0) - r(1, 1) - r(2, 2),
            1.0 - r(0, 0) + r(1, 1) - r(2, 2),
            1.0 - r(0, 0) - r(1, 1) + r(2, 2),
        ],
        axis=-1,
    )
    best = np.argmax(cand, axis=-1)
    s = 2.0 * np.sqrt(np.maximum(np.take_along_axis(cand, best[..., None], -1)[..., 0], 1e-300))
    q0 = np.stack([0.25 * s, (r(2, 1) - r(1, 2)) / s, (r(0, 2) - r(2, 0)) / s, (r(1, 0) - r(0, 1)) / s], -1)
    q1 = np.stack([(r(2, 1) - r(1, 2)) / s, 0.25 * s, (r(0, 1) + r(1, 0)) / s, (r(0, 2) + r(2, 0)) / s], -1)
    q2 = np.stack([(r(0, 2) - r(2, 0)) / s, (r(0, 1) + r(1, 0)) / s, 0.25 * s, (r(1, 2) + r(2, 1)) / s], -1)
    q3 = np.stack([(r(1, 0) - r(0, 1)) / s, (r(0, 2) + r(2, 0)) / s, (r(1, 2) + r(2, 1)) / s, 0.25 * s], -1)
    q = np.choose(best[..., None], [q0, q1, q2, q3])
    q = np.where(q[..., :1] < 0, -q, q)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def quat_multiply_wxyz(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a ⊗ b of wxyz quaternions (broadcasting)."""
    aw, ax, ay, az = np.moveaxis(np.asarray(a, dtype=np.float64), -1, 0)
    bw, bx, by, bz = np.moveaxis(np.asarray(b, dtype=np.float64), -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def slerp_wxyz(q0: np.ndarray, q1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Shortest-path spherical interpolation between unit wxyz quaternions, t in [0, 1]."""
    q0 = normalize_quat(q0)
    q1 = normalize_quat(q1)
    t = np.asarray(t, dtype=np.float64)[..., None]
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)
    dot = np.abs(dot)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    sin_theta = np.sin(theta)
    small = sin_theta < 1e-8
    safe = np.where(small, 1.0, sin_theta)
    w0 = np.where(small, 1.0 - t, np.sin((1.0 - t) * theta) / safe)
    w1 = np.where(small, t, np.sin(t * theta) / safe)
    return normalize_quat(w0 * q0 + w1 * q1)


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


def interpolate_poses(
    timestamps_us: np.ndarray, transforms: np.ndarray, t_us: np.ndarray | int | float
) -> np.ndarray:
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
