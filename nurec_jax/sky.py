"""Sky cubemap convention.

NuRec stores the sky as `.background.textures` [1, 6, S, S, 3], faces +X, -X, +Y, -Y, +Z, -Z
(OpenGL order). NuRec's own renderer (its source is public in NVIDIA's instant-nurec repository)
maps a direction d of the sky (NRE) frame, z up, onto the GL cube as

    gl = (-d_y, d_z, -d_x)

so GL +Y is up and GL -Z looks along the scene's +x, then samples the cube with OpenGL's per-face
(sc, tc) rules (row = tc, column = sc). (Two third-party readers had disagreed by a 180° yaw;
the one matching NuRec is kept.) World directions are first rotated into the sky frame with
`Sky.rotation_world_to_sky`. Both functions accept numpy or jax.numpy (`xp`), so generator and
renderer share them.
"""

from __future__ import annotations

import numpy as np

# Per face: (index of the major GL axis, its sign, (sc axis, sc sign), (tc axis, tc sign)).
_FACES = (
    (0, +1, (2, -1), (1, -1)),
    (0, -1, (2, +1), (1, -1)),
    (1, +1, (0, +1), (2, +1)),
    (1, -1, (0, +1), (2, -1)),
    (2, +1, (0, +1), (1, -1)),
    (2, -1, (0, -1), (1, -1)),
)


def to_gl(d, xp=np):
    return xp.stack([-d[..., 1], d[..., 2], -d[..., 0]], axis=-1)


def from_gl(g, xp=np):
    return xp.stack([-g[..., 2], -g[..., 0], g[..., 1]], axis=-1)


def direction_to_face_uv(d, xp=np):
    """Sky-frame directions (..., 3) -> (face index, u, v), u/v in [0, 1] (u = column, v = row)."""
    g = to_gl(d, xp)
    a = xp.abs(g)
    axis = xp.argmax(a, axis=-1)
    sign_pos = xp.take_along_axis(g, axis[..., None], -1)[..., 0] >= 0
    face = 2 * axis + xp.where(sign_pos, 0, 1)
    ma = xp.maximum(xp.take_along_axis(a, axis[..., None], -1)[..., 0], 1e-12)
    sc = xp.zeros_like(ma)
    tc = xp.zeros_like(ma)
    for f, (_, _, (sa, ss), (ta, ts)) in enumerate(_FACES):
        sel = face == f
        sc = xp.where(sel, ss * g[..., sa], sc)
        tc = xp.where(sel, ts * g[..., ta], tc)
    return face, 0.5 * (sc / ma + 1.0), 0.5 * (tc / ma + 1.0)


def texel_directions(size: int) -> np.ndarray:
    """Unit sky-frame directions through the centre of every texel: (6, S, S, 3)."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    tc, sc = np.meshgrid(c, c, indexing="ij")
    out = np.zeros((6, size, size, 3))
    for f, (axis, sign, (sa, ss), (ta, ts)) in enumerate(_FACES):
        g = np.zeros((size, size, 3))
        g[..., axis] = sign
        g[..., sa] = ss * sc
        g[..., ta] = ts * tc
        out[f] = from_gl(g / np.linalg.norm(g, axis=-1, keepdims=True))
    return out
