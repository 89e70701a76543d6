"""Real spherical harmonics (degree <= 3) in the 3DGS / gsplat / 3DGUT convention.

`sh_basis` works on numpy or jax arrays (`xp`), so the loader (numpy) and the renderer (jnp)
share one definition of the basis.
"""

from __future__ import annotations

import numpy as np

C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)
MAX_DEGREE = 3


def num_coeffs(degree: int) -> int:
    return (degree + 1) ** 2


def sh_basis(dirs, degree: int, xp=np):
    """Evaluates the SH basis for unit directions.

    Args:
      dirs: (..., 3) unit directions.
      degree: 0..3.
      xp: numpy or jax.numpy.

    Returns:
      (..., (degree + 1) ** 2) basis values, DC first.
    """
    if not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"{degree=} must be in [0, {MAX_DEGREE}]")
    x, y, z = dirs[..., 0], dirs[..., 1], dirs[..., 2]
    out = [xp.full_like(x, C0)]
    if degree >= 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _C2[0] * x * y,
            _C2[1] * y * z,
            _C2[2] * (2.0 * zz - xx - yy),
            _C2[3] * x * z,
            _C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            _C3[0] * y * (3.0 * xx - yy),
            _C3[1] * x * y * z,
            _C3[2] * y * (4.0 * zz - xx - yy),
            _C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            _C3[4] * x * (4.0 * zz - xx - yy),
            _C3[5] * z * (xx - yy),
            _C3[6] * x * (xx - 3.0 * yy),
        ]
    return xp.stack(out, axis=-1)


def sh_to_rgb(sh, dirs, degree: int, xp=np):
    """Colour of SH coefficients `sh` (..., K, 3) toward `dirs` (..., 3): max(0, 0.5 + sum Y_k c_k)."""
    basis = sh_basis(dirs, degree, xp)
    k = basis.shape[-1]
    return xp.maximum(xp.sum(basis[..., :, None] * sh[..., :k, :], axis=-2) + 0.5, 0.0)


def rotation_matrix_for_sh(q: np.ndarray, degree: int) -> np.ndarray:
    """The (K, K) matrix M with Y(q^T d) = Y(d) @ M for orthogonal `q` (3x3, reflections allowed).

    Coefficients `c` evaluated in a frame rotated by `q` (colour(d) = sum_k c_k Y_k(q^T d)) become
    `M @ c` in the outer frame. Each SH band is closed under O(3), so a least-squares fit on enough
    directions is exact to rounding; this avoids hand-written Wigner matrices.
    """
    rng = np.random.default_rng(0)
    d = rng.normal(size=(64, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    a = sh_basis(d, degree)
    b = sh_basis(d @ np.asarray(q, np.float64), degree)  # rows: q^T d_i
    m, *_ = np.linalg.lstsq(a, b, rcond=None)
    return m
