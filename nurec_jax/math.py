"""Gradient-safe jnp helpers: norms, quaternions, SO(3)/SE(3) maps and pose interpolation.

Quaternions are Hamilton (w, x, y, z). The quaternion maths serves both array libraries through an `xp`
argument (jax.numpy by default; `geometry.py` calls it with numpy in float64 for the host side), so the
formulas exist once. NaN-free gradients: every branch that could divide by zero
computes on a safe substitute inside `jnp.where` (a NaN in the untaken branch still poisons
reverse-mode AD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False, eps: float = 1e-20) -> jax.Array:
    """Euclidean norm whose gradient at 0 is 0 instead of NaN."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    safe = jnp.where(sq > eps, sq, 1.0)
    return jnp.where(sq > eps, jnp.sqrt(safe), 0.0)


def safe_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-20) -> jax.Array:
    n = safe_norm(x, axis=axis, keepdims=True, eps=eps)
    return x / jnp.where(n > 0, n, 1.0)


def quat_normalize(q, xp=jnp):
    """Unit quaternions along the last axis; a zero quaternion stays zero (no NaN, no NaN gradient)."""
    sq = xp.sum(q * q, axis=-1, keepdims=True)
    ok = sq > 1e-20
    return q / xp.sqrt(xp.where(ok, sq, 1.0))


def quat_multiply(a, b, xp=jnp):
    """Hamilton product a (x) b of wxyz quaternions, broadcast."""
    aw, ax, ay, az = xp.moveaxis(a, -1, 0)
    bw, bx, by, bz = xp.moveaxis(b, -1, 0)
    return xp.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def quat_conjugate(q: jax.Array) -> jax.Array:
    return q * jnp.array([1.0, -1.0, -1.0, -1.0], q.dtype)


def matvec(m: jax.Array, v: jax.Array) -> jax.Array:
    """m (..., 3, 3) times v (..., 3), broadcast, written as multiply-adds (XLA:CPU runs these tiny
    contractions several times faster than an einsum)."""
    return m[..., :, 0] * v[..., None, 0] + m[..., :, 1] * v[..., None, 1] + m[..., :, 2] * v[..., None, 2]


def matmul33(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (..., 3, 3) @ b (..., 3, 3), broadcast, as multiply-adds (see `matvec`)."""
    return a[..., :, 0:1] * b[..., 0:1, :] + a[..., :, 1:2] * b[..., 1:2, :] + a[..., :, 2:3] * b[..., 2:3, :]


def quat_to_matrix(q, xp=jnp):
    """(..., 4) wxyz (normalised here) -> (..., 3, 3)."""
    w, x, y, z = xp.moveaxis(quat_normalize(q, xp), -1, 0)
    return xp.stack(
        [
            xp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            xp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            xp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )


def matrix_to_quat(m, xp=jnp):
    """(..., 3, 3) rotation -> (..., 4) unit wxyz with w >= 0 (Shepperd's method: built from the largest
    of the four |q_i| candidates, which is at least 1/4 for a rotation, so nothing small is divided by)."""
    r = lambda i, j: m[..., i, j]  # noqa: E731
    cand = xp.stack(
        [
            1.0 + r(0, 0) + r(1, 1) + r(2, 2),
            1.0 + r(0, 0) - r(1, 1) - r(2, 2),
            1.0 - r(0, 0) + r(1, 1) - r(2, 2),
            1.0 - r(0, 0) - r(1, 1) + r(2, 2),
        ],
        axis=-1,
    )
    best = xp.argmax(cand, axis=-1)
    s = 2.0 * xp.sqrt(xp.maximum(xp.max(cand, axis=-1), 1e-12))
    qs = xp.stack(
        [
            xp.stack([0.25 * s, (r(2, 1) - r(1, 2)) / s, (r(0, 2) - r(2, 0)) / s, (r(1, 0) - r(0, 1)) / s], -1),
            xp.stack([(r(2, 1) - r(1, 2)) / s, 0.25 * s, (r(0, 1) + r(1, 0)) / s, (r(0, 2) + r(2, 0)) / s], -1),
            xp.stack([(r(0, 2) - r(2, 0)) / s, (r(0, 1) + r(1, 0)) / s, 0.25 * s, (r(1, 2) + r(2, 1)) / s], -1),
            xp.stack([(r(1, 0) - r(0, 1)) / s, (r(0, 2) + r(2, 0)) / s, (r(1, 2) + r(2, 1)) / s, 0.25 * s], -1),
        ],
        axis=-2,
    )
    q = xp.take_along_axis(qs, best[..., None, None], axis=-2)[..., 0, :]
    return quat_normalize(xp.where(q[..., :1] < 0, -q, q), xp)


def so3_exp(omega: jax.Array) -> jax.Array:
    """Axis-angle (..., 3) -> unit wxyz quaternion, with a Taylor branch near 0."""
    theta_sq = jnp.sum(omega * omega, axis=-1, keepdims=True)
    small = theta_sq < 1e-8
    safe_sq = jnp.where(small, 1.0, theta_sq)
    theta = jnp.sqrt(safe_sq)
    half = 0.5 * theta
    real = jnp.where(small, 1.0 - theta_sq / 8.0, jnp.cos(half))
    imag = jnp.where(small, 0.5 - theta_sq / 48.0, jnp.sin(half) / theta)
    return jnp.concatenate([real, imag * omega], axis=-1)


# Above this |q0 . q1| slerp becomes nlerp. float32 (the renderer): 0.9995, where arccos's slope starts to
# blow up gradients; nlerp's error there is below float32 resolution. float64 (host): 1 - 1e-16.
SLERP_NLERP_ABOVE = {"float32": 0.9995, "float64": 1.0 - 1e-16}


def slerp(q0, q1, t, xp=jnp):
    """Shortest-path slerp of unit wxyz quaternions; nlerp where they (nearly) coincide
    (`SLERP_NLERP_ABOVE`, by dtype)."""
    t = xp.asarray(t)[..., None]
    dot = xp.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = xp.where(dot < 0, -q1, q1)
    dot = xp.abs(dot)
    close = dot > SLERP_NLERP_ABOVE.get(str(dot.dtype), SLERP_NLERP_ABOVE["float32"])
    omega = xp.arccos(xp.clip(xp.where(close, 0.5, dot), -1.0, 1.0))
    sin_omega = xp.sin(omega)
    w0 = xp.where(close, 1.0 - t, xp.sin((1.0 - t) * omega) / sin_omega)
    w1 = xp.where(close, t, xp.sin(t * omega) / sin_omega)
    return quat_normalize(w0 * q0 + w1 * q1, xp)


def rotate(q: jax.Array, v: jax.Array) -> jax.Array:
    """Rotates vectors v (..., 3) by unit quaternions q (..., 4)."""
    return jnp.einsum("...ij,...j->...i", quat_to_matrix(q), v)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1); capacity buckets and Triton block sizes."""
    return 1 << max(0, int(n - 1).bit_length())
