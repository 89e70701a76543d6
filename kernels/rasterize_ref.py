"""Per-tile compositing with per-ray 3D Gaussian evaluation ("eval3d"), in plain jnp.

This is the reference twin of the Pallas rasterization kernel: same signature, no Pallas import.
For each 16x16 tile it walks the tile's depth-sorted Gaussian list in chunks, evaluates every
Gaussian on every pixel's ray at the ray's point of maximum response, and composites front to
back with NuRec's constants (rendering.md 2.3, 1.4, 7).

Two implementations share the per-chunk math:
  * `rasterize_tiles_ref`: the production reference. Each tile walks only its own list and stops
    when every pixel is done (while loops), and a `jax.custom_vjp` backward walks each tile's list in
    reverse, recovering transmittance from the saved final T and each pixel's stop index, and
    differentiating the per-chunk eval3d locally (3DGS-style backward; no atomics: gradients are
    scatter-added per chunk while tiles are visited in sequence).
  * `rasterize_tiles_autodiff`: a rematerialised `lax.scan` over the full capacity, differentiated
    by JAX itself. Slow; the oracle that tests compare the custom backward against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nurec_jax import constants as C
from nurec_jax import math as nmath


def eval3d(o, d, means, quats, scales):
    """Maximum response of Gaussians along rays.

    Args:
      o, d: (..., 3) ray origins and unit directions, in each Gaussian's frame.
      means, quats, scales: (..., 3), (..., 4), (..., 3) Gaussian parameters (broadcast with o, d).

    Returns:
      (response, t_star): kernel response exp(-D^2/2) at the closest point, and its ray distance.
    """
    # Canonical frame: x_c = S^-1 R^T x. Written as broadcast multiply-adds rather than einsums:
    # XLA:CPU handles these tiny 3x3 contractions much faster that way.
    mt = nmath.quat_to_matrix(quats) / scales[..., None, :]  # mt[j, i] = R[j, i] / s_i
    diff = o - means
    o_c = diff[..., 0:1] * mt[..., 0, :] + diff[..., 1:2] * mt[..., 1, :] + diff[..., 2:3] * mt[..., 2, :]
    d_c = d[..., 0:1] * mt[..., 0, :] + d[..., 1:2] * mt[..., 1, :] + d[..., 2:3] * mt[..., 2, :]
    dd = jnp.sum(d_c * d_c, -1)
    od = jnp.sum(o_c * d_c, -1)
    t_star = -od / dd
    # Squared distance of the ray to the centre in the canonical frame, |o_c x d_c|^2 / |d_c|^2. The
    # textbook |o_c|^2 - (o_c.d_c)^2/|d_c|^2 subtracts two numbers of size (distance / scale)^2 (1e8 for a
    # 1 cm Gaussian 100 m away) and float32 leaves noise; the cross product's error is only
    # eps * |o_c| * |d_c|, so distant content stays exact (tests/test_far_field.py).
    d2 = jnp.sum(jnp.square(cross3(o_c, d_c)), -1) / dd
    return jnp.exp(-0.5 * d2), t_star


def cross3(a, b):
    """Cross product of (..., 3) arrays, written out (XLA:CPU runs this faster than jnp.cross)."""
    a0, a1, a2 = a[..., 0:1], a[..., 1:2], a[..., 2:3]
    b0, b1, b2 = b[..., 0:1], b[..., 1:2], b[..., 2:3]
    return jnp.concatenate([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], -1)


def alpha_of(response, t_star, opacity):
    """Composited alpha with NuRec's acceptance rules (min response, alpha threshold, t* > 0)."""
    alpha = jnp.minimum(C.MAX_ALPHA, opacity * response)
    ok = (response > C.MIN_KERNEL_RESPONSE) & (alpha > C.ALPHA_THRESHOLD) & (t_star > 0)
    return jnp.where(ok, alpha, 0.0)


def _chunk_alpha(ray, means, quats, scales, opacities):
    """ray [P, K, 6]; params [K, ...] -> (alpha [P, K], t_star [P, K])."""
    resp, t_star = eval3d(ray[..., :3], ray[..., 3:], means[None], quats[None], scales[None])
    return alpha_of(resp, t_star, opacities[None]), t_star


def composite_chunk(alpha, colors, t_star, transmittance, done):
    """Front-to-back compositing of one chunk of K Gaussians for a batch of pixels.

    Args:
      alpha: (..., K) alphas in depth order; colors (..., K, 3); t_star (..., K).
      transmittance, done: (...) state carried from earlier chunks.

    Returns:
      (rgb_add (..., 3), hit_add (...), transmittance, done, stop_index (...) within the chunk or K).
      A Gaussian that would bring T to or below the threshold is not added and ends the pixel
      (gsplat semantics).
    """
    k = alpha.shape[-1]
    a = jnp.where(done[..., None], 0.0, alpha)
    t_after = transmittance[..., None] * jnp.cumprod(1.0 - a, axis=-1)
    stop = t_after <= C.TRANSMITTANCE_THRESHOLD
    stopped = jnp.cumsum(stop.astype(jnp.int32), axis=-1) > 0
    a_eff = jnp.where(stopped, 0.0, a)
    one_minus = 1.0 - a_eff
    excl = jnp.concatenate([jnp.ones_like(one_minus[..., :1]), jnp.cumprod(one_minus[..., :-1], axis=-1)], -1)
    w = a_eff * excl * transmittance[..., None]
    rgb_add = jnp.sum(w[..., None] * colors, axis=-2)
    hit_add = jnp.sum(w * t_star, -1)
    new_t = transmittance * jnp.prod(one_minus, axis=-1)
    stop_index = jnp.where(jnp.any(stop, -1), jnp.argmax(stop, axis=-1), k)
    return rgb_add, hit_add, new_t, done | jnp.any(stop, axis=-1), stop_index


def _gather_rays(rays_t, frames_g):
    """rays_t [P, F, 6], frames_g [K] -> [P, K, 6]."""
    if rays_t.shape[1] == 1:
        return jnp.broadcast_to(rays_t[:, :1, :], (rays_t.shape[0], frames_g.shape[0], 6))
    return rays_t[:, frames_g, :]


def padded_pairs(pair_gids, chunk):
    """The pair list with `chunk` trailing -1 slots, so a chunk read at any list position stays in bounds."""
    return jnp.pad(pair_gids, (0, chunk), constant_values=-1)


def tile_chunk(gids, start, count, c, chunk):
    """Chunk `c` of one tile's list: (gids clamped to >= 0, live mask [chunk], list positions [chunk])."""
    pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    g = jax.lax.dynamic_slice_in_dim(gids, start + c * chunk, chunk)
    live = (g >= 0) & (pos < count)
    return jnp.where(live, g, 0), live, pos


# ----------------------------------------------------------------------------------------------
# Production reference: dynamic-length walks + custom VJP.


def _tile_forward(start, count, rays_t, valid_t, gids, means, quats, scales, opacities, colors, frames, chunk):
    """One tile. Returns (rgb [P,3], T [P], hit [P], stop_pos [P] (list position, or huge), chunks used)."""
    n_px = rays_t.shape[0]
    dtype = means.dtype
    big = jnp.int32(2 ** 30)

    def cond(state):
        c, _, _, _, done, _ = state
        return (c * chunk < count) & ~jnp.all(done)

    def body(state):
        c, rgb, hit, trans, done, stop_pos = state
        gs, live, _ = tile_chunk(gids, start, count, c, chunk)
        alpha, t_star = _chunk_alpha(_gather_rays(rays_t, frames[gs]), means[gs], quats[gs], scales[gs],
                                     jnp.where(live, opacities[gs], 0.0))
        alpha = jnp.where(valid_t[:, None], alpha, 0.0)
        was_done = done
        rgb_add, hit_add, trans, done, idx = composite_chunk(alpha, colors[gs][None], t_star, trans, done)
        stop_pos = jnp.where(~was_done & done, (c * chunk + idx).astype(jnp.int32), stop_pos)
        return c + 1, rgb + rgb_add, hit + hit_add, trans, done, stop_pos

    init = (jnp.int32(0), jnp.zeros((n_px, 3), dtype), jnp.zeros((n_px,), dtype), jnp.ones((n_px,), dtype),
            ~valid_t, jnp.full((n_px,), big))
    c, rgb, hit, trans, _, stop_pos = jax.lax.while_loop(cond, body, init)
    return rgb, trans, hit, stop_pos, c


def _forward_all(pair_gids, tile_start, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors,
                 frames, chunk, tile_batch):
    fn = functools.partial(_tile_forward, gids=padded_pairs(pair_gids, chunk), means=means, quats=quats, scales=scales, opacities=opacities,
                           colors=colors, frames=frames, chunk=chunk)
    # Tiles walked side by side run as long as the longest; batching tiles of similar length keeps
    # that waste small.
    order = jnp.argsort(tile_counts)
    inv = jnp.argsort(order)
    xs = jax.tree_util.tree_map(lambda x: x[order], (tile_start, tile_counts, rays, pixel_valid))
    out = jax.lax.map(lambda x: fn(*x), xs, batch_size=tile_batch)
    return jax.tree_util.tree_map(lambda x: x[inv], out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12))
def _rasterize(pair_gids, tile_start, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors,
               frames, chunk, tile_batch):
    rgb, trans, hit, _, _ = _forward_all(pair_gids, tile_start, tile_counts, rays, pixel_valid, means, quats,
                                         scales, opacities, colors, frames, chunk, tile_batch)
    return rgb, trans, hit


def _rasterize_fwd(pair_gids, tile_start, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors,
                   frames, chunk, tile_batch):
    rgb, trans, hit, stop_pos, used = _forward_all(pair_gids, tile_start, tile_counts, rays, pixel_valid, means,
                                                   quats, scales, opacities, colors, frames, chunk, tile_batch)
    res = (pair_gids, tile_start, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors, frames,
           trans, stop_pos, used)
    return (rgb, trans, hit), res


def _rasterize_bwd(chunk, tile_batch, res, cot):
    (pair_gids, tile_start, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors, frames,
     trans_final, stop_pos, used) = res
    g_rgb, g_trans, g_hit = cot
    gids = padded_pairs(pair_gids, chunk)
    n_frames = rays.shape[2]
    zeros = lambda x: jnp.zeros_like(x)  # noqa: E731
    acc0 = (zeros(means), zeros(quats), zeros(scales), zeros(opacities), zeros(colors))

    def tile_step(acc, xs):
        start, count, n_used, rays_t, valid_t, t_final, stop_t, g_c, g_t, g_h = xs
        n_px = rays_t.shape[0]

        def body(state):
            c, t_after, s_rgb, s_hit, acc, g_rays = state
            c = c - 1
            gs, live, pos = tile_chunk(gids, start, count, c, chunk)
            params = (means[gs], quats[gs], scales[gs], jnp.where(live, opacities[gs], 0.0))
            ray = _gather_rays(rays_t, frames[gs])
            (alpha, t_star), vjp = jax.vjp(_chunk_alpha, ray, *params)
            keep = valid_t[:, None] & (pos[None, :] < stop_t[:, None])
            a = jnp.where(keep, alpha, 0.0)
            one_minus = 1.0 - a
            # T before each Gaussian of the chunk, from T after the chunk (reverse cumulative product).
            rev = jnp.flip(jnp.cumprod(jnp.flip(one_minus, -1), -1), -1)  # prod_{m >= j}
            t_before = t_after[:, None] / rev
            w = a * t_before
            col = colors[gs]
            contrib_rgb = w[..., None] * col[None]  # [P, K, 3]
            contrib_hit = w * t_star
            # Sums over later Gaussians (this chunk's later ones plus later chunks).
            later_rgb = s_rgb[:, None, :] + jnp.flip(jnp.cumsum(jnp.flip(contrib_rgb, 1), 1), 1) - contrib_rgb
            later_hit = s_hit[:, None] + jnp.flip(jnp.cumsum(jnp.flip(contrib_hit, -1), -1), -1) - contrib_hit
            gc = g_c[:, None, :]
            d_alpha = t_before * (jnp.sum(col[None] * gc, -1) + t_star * g_h[:, None])
            d_alpha = d_alpha - (jnp.sum(later_rgb * gc, -1) + later_hit * g_h[:, None]
                                 + t_final[:, None] * g_t[:, None]) / one_minus
            d_alpha = jnp.where(keep, d_alpha, 0.0)
            d_tstar = jnp.where(keep, w * g_h[:, None], 0.0)
            d_ray, d_mean, d_quat, d_scale, d_op = vjp((d_alpha, d_tstar))
            d_col = jnp.einsum("pk,pc->kc", jnp.where(keep, w, 0.0), g_c)
            am, aq, asc, aop, acol = acc
            acc = (am.at[gs].add(jnp.where(live[:, None], d_mean, 0.0)),
                   aq.at[gs].add(jnp.where(live[:, None], d_quat, 0.0)),
                   asc.at[gs].add(jnp.where(live[:, None], d_scale, 0.0)),
                   aop.at[gs].add(jnp.where(live, d_op, 0.0)),
                   acol.at[gs].add(jnp.where(live[:, None], d_col, 0.0)))
            if n_frames == 1:
                g_rays = g_rays + jnp.sum(d_ray, 1)[:, None, :]
            else:
                onehot = jax.nn.one_hot(frames[gs], n_frames, dtype=d_ray.dtype)  # [K, F]
                g_rays = g_rays + jnp.einsum("kf,pkc->pfc", onehot, d_ray)
            t_before_chunk = t_after / rev[:, 0]
            return (c, t_before_chunk, s_rgb + jnp.sum(contrib_rgb, 1), s_hit + jnp.sum(contrib_hit, -1), acc,
                    g_rays)

        init = (n_used, t_final, jnp.zeros((n_px, 3), t_final.dtype), jnp.zeros((n_px,), t_final.dtype), acc,
                jnp.zeros_like(rays_t))
        _, _, _, _, acc, g_rays = jax.lax.while_loop(lambda s: s[0] > 0, body, init)
        return acc, g_rays

    xs = (tile_start, tile_counts, used, rays, pixel_valid, trans_final, stop_pos, g_rgb, g_trans, g_hit)
    (dm, dq, ds, dop, dcol), d_rays = jax.lax.scan(tile_step, acc0, xs)
    return (None, None, None, d_rays, None, dm, dq, ds, dop, dcol, None)


_rasterize.defvjp(_rasterize_fwd, _rasterize_bwd)


def rasterize_tiles_ref(
    pair_gids,  # [M] int32 Gaussian ids sorted by (tile, depth); -1 past the last pair
    tile_start,  # [T] int32 each tile's first position in pair_gids
    tile_counts,  # [T] int32 entries of each tile's list to composite
    rays,  # [T, P, F, 6] per-pixel ray (origin, direction) in each frame
    pixel_valid,  # [T, P] bool
    means,  # [N, 3] in each Gaussian's frame
    quats,  # [N, 4]
    scales,  # [N, 3]
    opacities,  # [N]
    colors,  # [N, 3]
    frames,  # [N] int32 frame index of each Gaussian (0 = world)
    *,
    chunk: int = 32,
    tile_batch: int = 8,
):
    """Composites every tile. Returns (rgb [T, P, 3], transmittance [T, P], hit [T, P]).

    Differentiable (custom VJP) with respect to rays, means, quats, scales, opacities and colors.
    """
    return _rasterize(pair_gids, tile_start, tile_counts, rays, pixel_valid, means, quats, scales, opacities,
                      colors, frames, chunk, tile_batch)


# ----------------------------------------------------------------------------------------------
# Autodiff oracle.


def rasterize_tiles_autodiff(pair_gids, tile_start, tile_counts, rays, pixel_valid, means, quats, scales, opacities,
                             colors, frames, *, capacity: int, chunk: int = 32):
    """Same result as `rasterize_tiles_ref` (lists of at most `capacity`), walking every tile's full capacity
    with a differentiable scan."""
    n_chunks = -(-capacity // chunk)
    j = jnp.arange(n_chunks * chunk, dtype=jnp.int32)
    pos = jnp.clip(tile_start[:, None] + j[None, :], 0, pair_gids.shape[0] - 1)
    gids = jnp.where(j[None, :] < tile_counts[:, None], pair_gids[pos], -1)
    n_tiles, n_px = rays.shape[:2]
    dtype = means.dtype

    def step(carry, c):
        rgb, hit, trans, done = carry
        g = jax.lax.dynamic_slice_in_dim(gids, c * chunk, chunk, axis=1)  # [T, K]
        gs = jnp.maximum(g, 0)
        op = jnp.where(g >= 0, opacities[gs], 0.0)
        alpha, t_star = jax.vmap(_chunk_alpha)(jax.vmap(_gather_rays)(rays, frames[gs]), means[gs], quats[gs],
                                               scales[gs], op)
        alpha = jnp.where(pixel_valid[..., None], alpha, 0.0)
        rgb_add, hit_add, trans, done, _ = composite_chunk(alpha, colors[gs][:, None], t_star, trans, done)
        return (rgb + rgb_add, hit + hit_add, trans, done), None

    init = (jnp.zeros((n_tiles, n_px, 3), dtype), jnp.zeros((n_tiles, n_px), dtype),
            jnp.ones((n_tiles, n_px), dtype), ~pixel_valid)
    (rgb, hit, trans, _), _ = jax.lax.scan(jax.checkpoint(step), init, jnp.arange(n_chunks))
    return rgb, trans, hit
