"""Binning: (tile, Gaussian) pairs for every Gaussian's pixel rectangle in a fixed-capacity buffer, one
packed uint32 key each (tile id in the high bits, quantised log depth in the low bits), one stable
sort, and each tile's range of the sorted list. Used by the camera and the lidar alike.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from nurec_jax import constants as C


def tile_bits(n_tiles: int) -> int:
    return max(1, math.ceil(math.log2(n_tiles + 1)))


def depth_key(depth: jax.Array, depth_bits: int) -> jax.Array:
    """Quantised log depth in [0, 2^depth_bits - 1] (uint32), monotone in depth."""
    near = C.NEAR_CLIP * 0.5
    lo, hi = math.log(near), math.log(C.DEPTH_KEY_FAR)
    q = (jnp.log(jnp.maximum(depth, near)) - lo) / (hi - lo)
    levels = (1 << depth_bits) - 1
    return jnp.clip(jnp.floor(q * levels), 0, levels).astype(jnp.uint32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Binning:
    """Result of tile binning: one list of Gaussian ids sorted by (tile, depth) and each tile's range in it.

    No [tiles, longest list] table is built: memory is O(pair_capacity), whatever the longest tile.
    """

    pair_gids: jax.Array  # [pair_capacity] int32, -1 past the last pair
    tile_start: jax.Array  # [T] int32 first position of each tile in pair_gids
    tile_counts: jax.Array  # [T] int32 list length
    num_pairs: jax.Array  # () int32
    max_tile_pairs: jax.Array  # () int32


def bin_gaussians(
    rect_lo,
    rect_hi,
    valid,
    opacities,
    depth,
    tiles_x: int,
    tiles_y: int,
    pair_capacity: int,
    tile_size: int = C.TILE_SIZE,
) -> Binning:
    """Emits (tile, Gaussian) pairs for each Gaussian's pixel rectangle and sorts them by (tile, depth)."""
    n_tiles = tiles_x * tiles_y
    if rect_lo.shape[0] == 0:
        return Binning(
            jnp.full((pair_capacity,), -1, jnp.int32),
            jnp.zeros(n_tiles, jnp.int32),
            jnp.zeros(n_tiles, jnp.int32),
            jnp.int32(0),
            jnp.int32(0),
        )
    tbits = tile_bits(n_tiles)
    dbits = 32 - tbits
    lo = jnp.floor(rect_lo / tile_size)
    hi = jnp.floor(rect_hi / tile_size)
    finite = jnp.all(jnp.isfinite(lo) & jnp.isfinite(hi), -1)
    big = float(max(tiles_x, tiles_y) + 1)
    lo = jnp.clip(jnp.nan_to_num(lo), -1, big)
    hi = jnp.clip(jnp.nan_to_num(hi), -1, big)
    x0 = jnp.clip(lo[:, 0], 0, tiles_x - 1).astype(jnp.int32)
    y0 = jnp.clip(lo[:, 1], 0, tiles_y - 1).astype(jnp.int32)
    x1 = jnp.clip(hi[:, 0], 0, tiles_x - 1).astype(jnp.int32)
    y1 = jnp.clip(hi[:, 1], 0, tiles_y - 1).astype(jnp.int32)
    inside = (hi[:, 0] >= 0) & (lo[:, 0] <= tiles_x - 1) & (hi[:, 1] >= 0) & (lo[:, 1] <= tiles_y - 1)
    keep = valid & finite & inside & (opacities >= C.ALPHA_THRESHOLD)
    nx = jnp.where(keep, x1 - x0 + 1, 0)
    ny = jnp.where(keep, y1 - y0 + 1, 0)
    counts = nx * ny
    offsets = jnp.cumsum(counts)
    total = offsets[-1]
    cap = pair_capacity
    slot = jnp.arange(cap, dtype=jnp.int32)
    g = jnp.clip(jnp.searchsorted(offsets, slot, side="right"), 0, counts.shape[0] - 1).astype(jnp.int32)
    local = slot - (offsets[g] - counts[g])
    nxg = jnp.maximum(nx[g], 1)
    tile = (y0[g] + local // nxg) * tiles_x + x0[g] + local % nxg
    dkey = depth_key(depth, dbits)
    key = (tile.astype(jnp.uint32) << jnp.uint32(dbits)) | dkey[g]
    key = jnp.where(slot < total, key, jnp.uint32(0xFFFFFFFF))
    skey, sg = jax.lax.sort((key, g), num_keys=1, is_stable=True)
    stile = (skey >> jnp.uint32(dbits)).astype(jnp.int32)  # invalid slots: 2^tbits - 1 >= n_tiles
    tids = jnp.arange(n_tiles, dtype=jnp.int32)
    start = jnp.searchsorted(stile, tids, side="left").astype(jnp.int32)
    end = jnp.searchsorted(stile, tids, side="right").astype(jnp.int32)
    tcount = end - start
    gids = jnp.where(slot < total, sg, -1)
    return Binning(gids, start, tcount, total.astype(jnp.int32), jnp.max(tcount).astype(jnp.int32))
