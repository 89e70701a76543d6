"""Exposure times and rays: when each pixel is exposed (rolling shutter), the camera pose at that time,
and each pixel's ray in every frame (docs/rendering.md#rolling-shutter).

Exposure times are quantised to rows (or columns) of the image, so poses come from a per-row table
(`pose_table`) built once per frame. Pixels are laid out tile by tile (`pixel_grid` / `untile`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nurec_jax import constants as C
from nurec_jax import math as nmath
from nurec_jax.cameras import Camera
from nurec_jax.metadata import ShutterType
from nurec_jax.poses import PosePair


def shutter_tau(uv: jax.Array, width: int, height: int, shutter_type: int) -> jax.Array:
    """Relative exposure time in [0, 1] of continuous image points (docs/rendering.md#rolling-shutter)."""
    u, v = uv[..., 0], uv[..., 1]
    hm, wm = max(height - 1, 1), max(width - 1, 1)
    st = ShutterType(shutter_type)
    if st == ShutterType.ROLLING_TOP_TO_BOTTOM:
        tau = jnp.floor(v) / hm
    elif st == ShutterType.ROLLING_LEFT_TO_RIGHT:
        tau = jnp.floor(u) / wm
    elif st == ShutterType.ROLLING_BOTTOM_TO_TOP:
        tau = (height - jnp.ceil(v)) / hm
    elif st == ShutterType.ROLLING_RIGHT_TO_LEFT:
        tau = (width - jnp.ceil(u)) / wm
    else:
        return jnp.zeros_like(u)
    return jnp.clip(tau, 0.0, 1.0)


def effective_shutter(camera: Camera, disable_rolling_shutter: bool) -> int:
    """The shutter a frame renders with: the camera's, or global when rolling shutter is disabled."""
    if disable_rolling_shutter:
        return int(ShutterType.GLOBAL)
    return int(camera.shutter_type)


def shutter_levels(width: int, height: int, shutter: int) -> int:
    """How many distinct exposure times a shutter has (rows or columns; 1 for a global shutter)."""
    st = ShutterType(shutter)
    if st in (ShutterType.ROLLING_TOP_TO_BOTTOM, ShutterType.ROLLING_BOTTOM_TO_TOP):
        return max(height, 1)
    if st in (ShutterType.ROLLING_LEFT_TO_RIGHT, ShutterType.ROLLING_RIGHT_TO_LEFT):
        return max(width, 1)
    return 1


def level_of(tau, levels: int):
    return jnp.clip(jnp.round(tau * max(levels - 1, 1)), 0, levels - 1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PoseTable:
    """Poses at every distinct exposure time (rolling-shutter rows/columns), as matrices."""

    rot: jax.Array  # [L, ..., 3, 3]
    trans: jax.Array  # [L, ..., 3]


def pose_table(pair: PosePair, levels: int, dtype, invert: bool = False) -> PoseTable:
    tau = jnp.arange(levels, dtype=dtype) / max(levels - 1, 1)
    extra = pair.start.trans.ndim - 1
    pose = pair.at(tau.reshape((levels,) + (1,) * extra))
    if invert:
        pose = pose.inverse()
    return PoseTable(pose.rotation(), pose.trans)


def pixel_grid(width: int, height: int, tile: int = C.TILE_SIZE):
    """Pixel centres laid out per tile: (uv [T, tile*tile, 2], valid [T, tile*tile], tiles_x, tiles_y)."""
    tx, ty = -(-width // tile), -(-height // tile)
    ys, xs = np.meshgrid(np.arange(ty * tile), np.arange(tx * tile), indexing="ij")
    # [ty, tile, tx, tile] -> [ty, tx, tile, tile] -> [T, P]
    xs = xs.reshape(ty, tile, tx, tile).transpose(0, 2, 1, 3).reshape(tx * ty, tile * tile)
    ys = ys.reshape(ty, tile, tx, tile).transpose(0, 2, 1, 3).reshape(tx * ty, tile * tile)
    uv = np.stack([xs + 0.5, ys + 0.5], -1)
    valid = (xs < width) & (ys < height)
    return uv, valid, tx, ty


def untile(x: jax.Array, width: int, height: int, tile: int = C.TILE_SIZE) -> jax.Array:
    """[T, tile*tile, ...] -> [H, W, ...]."""
    tx, ty = -(-width // tile), -(-height // tile)
    rest = x.shape[2:]
    x = x.reshape(ty, tx, tile, tile, *rest)
    x = jnp.moveaxis(x, 2, 1).reshape(ty * tile, tx * tile, *rest)
    return x[:height, :width]


def camera_rays(camera: Camera, sensor_pose: PosePair, frames: PosePair, shutter: int, tile: int):
    """Every pixel's ray (tile layout) in every frame: (rays [T, P, F, 6] (origin, direction),
    world directions [T, P, 3] for the sky). Differentiable with respect to the poses."""
    width, height = camera.width, camera.height
    dtype = sensor_pose.start.trans.dtype
    uv_np, _, _, _ = pixel_grid(width, height, tile)
    uv = jnp.asarray(uv_np, dtype)
    levels = shutter_levels(width, height, shutter)
    level = level_of(shutter_tau(uv, width, height, shutter), levels)  # [T, P]
    cam_tab = pose_table(sensor_pose, levels, dtype)  # camera -> world per row/column
    d_cam = camera.unproject(uv)
    origin = cam_tab.trans[level]
    direction = nmath.safe_normalize(nmath.matvec(cam_tab.rot[level], d_cam))
    if frames.start.quat.shape[0] == 1:
        return jnp.concatenate([origin, direction], -1)[:, :, None, :], direction
    inv_tab = pose_table(frames, levels, dtype, invert=True)  # world -> frame, [L, F]
    rf, tf = inv_tab.rot[level], inv_tab.trans[level]  # [T, P, F, ...]
    o_f = nmath.matvec(rf, origin[:, :, None]) + tf
    d_f = nmath.matvec(rf, direction[:, :, None])
    return jnp.concatenate([o_f, d_f], -1), direction
