"""Compositing dispatch: eval3d + front-to-back compositing of every tile's sorted list, by the backend's
compositor (`nurec_jax.kernels`: the plain-jnp units walk, or the Pallas kernel on GPU). Shared by the
camera and the lidar."""

from __future__ import annotations

import jax.numpy as jnp

from nurec_jax.kernels import rasterize_pallas, rasterize_ref
from nurec_jax.render_options import resolved_implementation


def compositor(implementation: str):
    """The per-tile compositor for an `implementation` name (see RenderOptions)."""
    impl = resolved_implementation(implementation)
    return rasterize_pallas.rasterize_tiles_pallas if impl == "pallas" else rasterize_ref.rasterize_tiles_ref


def composite_tiles(
    implementation: str,
    pair_gids,
    tile_start,
    tile_counts,
    rays,
    pixel_valid,
    means,
    quats,
    scales,
    opacities,
    colors,
    frames,
    *,
    chunk: int,
    tile_batch: int,
):
    """(rgb [T, P, 3], transmittance [T, P], hit [T, P]) of every tile; a scene without Gaussians is all
    transmittance (nothing to evaluate)."""
    if means.shape[0] == 0:
        n_t, n_p = pixel_valid.shape
        dtype = rays.dtype
        return jnp.zeros((n_t, n_p, 3), dtype), jnp.ones((n_t, n_p), dtype), jnp.zeros((n_t, n_p), dtype)
    return compositor(implementation)(
        pair_gids,
        tile_start,
        tile_counts,
        rays,
        pixel_valid,
        means,
        quats,
        scales,
        opacities,
        colors,
        frames,
        chunk=chunk,
        tile_batch=tile_batch,
    )
