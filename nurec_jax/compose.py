"""Compose: the sky behind the composited Gaussians, alpha and depth, tiles back to an image."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from nurec_jax import sky as sky_lib
from nurec_jax.cameras import Camera
from nurec_jax.rays import untile
from nurec_jax.types import Sky


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RenderOutput:
    """One rendered frame.

    Attributes:
      rgb: (H, W, 3) colour in [0, 1] with the sky behind.
      alpha: (H, W) accumulated opacity 1 - T.
      hit_distance: (H, W) sum of w_i t*_i (not divided by alpha), metres along the ray.
      depth: (H, W) expected ray distance hit_distance / alpha (0 where alpha ~ 0).
      num_pairs: () int32 (tile, Gaussian) pairs needed; > pair_capacity means overflow.
      max_tile_pairs: () int32 longest per-tile list (a diagnostic: the work of the slowest tile).
    """

    rgb: jax.Array
    alpha: jax.Array
    hit_distance: jax.Array
    depth: jax.Array
    num_pairs: jax.Array
    max_tile_pairs: jax.Array


def sky_color(sky: Sky, dirs_world: jax.Array) -> jax.Array:
    """Bilinear cubemap lookup (or the constant colour) toward world directions (..., 3)."""
    if sky.cubemap is None:
        return jnp.broadcast_to(sky.color.astype(dirs_world.dtype), dirs_world.shape)
    d = jnp.einsum("ij,...j->...i", sky.rotation_world_to_sky.astype(dirs_world.dtype), dirs_world)
    face, u, v = sky_lib.direction_to_face_uv(d, jnp)
    cube = sky.cubemap.astype(dirs_world.dtype)
    size = cube.shape[1]
    x = jnp.clip(u * size - 0.5, 0.0, size - 1.0)
    y = jnp.clip(v * size - 0.5, 0.0, size - 1.0)
    x0 = jnp.clip(jnp.floor(x), 0, size - 2).astype(jnp.int32) if size > 1 else jnp.zeros_like(x, jnp.int32)
    y0 = jnp.clip(jnp.floor(y), 0, size - 2).astype(jnp.int32) if size > 1 else jnp.zeros_like(y, jnp.int32)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    x1 = jnp.minimum(x0 + 1, size - 1)
    y1 = jnp.minimum(y0 + 1, size - 1)
    c00, c01 = cube[face, y0, x0], cube[face, y0, x1]
    c10, c11 = cube[face, y1, x0], cube[face, y1, x1]
    return (1 - fy) * ((1 - fx) * c00 + fx * c01) + fy * ((1 - fx) * c10 + fx * c11)


def compose_image(sky: Sky, camera: Camera, direction, rgb, trans, hit, num_pairs, max_tile_pairs) -> RenderOutput:
    """Sky behind (toward world `direction` [T, P, 3]), alpha and depth, tiles -> image."""
    width, height = camera.width, camera.height
    tile = math.isqrt(rgb.shape[1])  # [T, tile * tile, 3]
    with jax.named_scope("compose"):
        rgb = rgb + trans[..., None] * sky_color(sky, direction)
        alpha = 1.0 - trans
        depth_px = jnp.where(alpha > 1e-6, hit / jnp.where(alpha > 1e-6, alpha, 1.0), 0.0)
    return RenderOutput(
        rgb=untile(rgb, width, height, tile),
        alpha=untile(alpha, width, height, tile),
        hit_distance=untile(hit, width, height, tile),
        depth=untile(depth_px, width, height, tile),
        num_pairs=num_pairs,
        max_tile_pairs=max_tile_pairs,
    )
