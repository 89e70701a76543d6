"""Per-tile compositing with per-ray 3D Gaussian evaluation ("eval3d"), in plain jnp.

This is the reference twin of the Pallas rasterization kernel: same signature, no Pallas import.
For each tile it composites the tile's depth-sorted Gaussian list, evaluating every Gaussian on every
pixel's ray at the ray's point of maximum response, front to back with NuRec's constants
(docs/rendering.md#eval3d, #compositing, #constants).

Two implementations share the per-chunk math (`eval3d`, `alpha_of`):
  * `rasterize_tiles_ref`: the production reference. Every tile's list is cut into units of `chunk`
    pairs and one rolled loop composites the units of all tiles side by side, with each unit's
    incoming transmittance from a segmented scan (see "Production reference" below), so the work
    follows the total number of pairs rather than the longest tile. A `jax.custom_vjp` backward walks
    the same steps in reverse, carrying each tile's "everything behind" sums, and differentiates each
    step's eval3d locally (no atomics: gradients are scatter-added step by step).
  * `rasterize_tiles_autodiff`: a rematerialised `lax.scan` over the full capacity, differentiated
    by JAX itself. Slow; the oracle that tests compare the custom forward and backward against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from nurec_jax import constants as C


def eval3d(o, d, means, quats, scales):
    """Maximum response of Gaussians along rays.

    Args:
      o, d: (..., 3) ray origins and unit directions, in each Gaussian's frame.
      means, quats, scales: (..., 3), (..., 4), (..., 3) Gaussian parameters (broadcast with o, d).

    Returns:
      (response, t_star): kernel response exp(-D^2/2) at the closest point, and its ray distance.
    """
    return eval3d_components(_split(o, 3), _split(d, 3), _split(means, 3), _split(quats, 4), _split(scales, 3))


def _split(x, n):
    return tuple(x[..., i] for i in range(n))


def canonical_matrix(quats, scales):
    """Rows m[i] = (column i of R) / s_i of M = S^-1 R^T (x_c = M x), as nested tuples of components."""
    qw, qx, qy, qz = quats
    inv = jax.lax.rsqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    qw, qx, qy, qz = qw * inv, qx * inv, qy * inv, qz * inv
    r = (
        (1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)),
        (2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx)),
        (2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy)),
    )
    return tuple((r[0][i] / sc, r[1][i] / sc, r[2][i] / sc) for i, sc in enumerate(scales))


def eval3d_components(o, d, means, quats, scales):
    """`eval3d` on tuples of components (o = (ox, oy, oz), quats = (w, x, y, z), ...), each broadcasting.

    Written per component, so every intermediate is a full-size array whose last axis is a batch axis
    (chunk of Gaussians, pixels): XLA:CPU vectorises that; (..., 3)-shaped intermediates it does not,
    and eval3d is most of the compositing work.
    """
    ray = _canonical_ray(o, d, means, canonical_matrix(quats, scales))
    return jnp.exp(-0.5 * ray["d2"]), ray["t_star"]


def _cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _canonical_ray(o, d, means, m):
    """The ray in a Gaussian's canonical frame (m from `canonical_matrix`): the offset o - mean, o_c,
    d_c, |d_c|^2, o_c.d_c, c = o_c x d_c, and from them t* and D^2 (shared by eval3d and its VJP)."""
    diff = tuple(o[j] - means[j] for j in range(3))
    oc = tuple(mi[0] * diff[0] + mi[1] * diff[1] + mi[2] * diff[2] for mi in m)
    dc = tuple(mi[0] * d[0] + mi[1] * d[1] + mi[2] * d[2] for mi in m)
    dd = dc[0] * dc[0] + dc[1] * dc[1] + dc[2] * dc[2]
    od = oc[0] * dc[0] + oc[1] * dc[1] + oc[2] * dc[2]
    # Squared distance of the ray to the centre in the canonical frame, |o_c x d_c|^2 / |d_c|^2. The
    # textbook |o_c|^2 - (o_c.d_c)^2/|d_c|^2 subtracts two numbers of size (distance / scale)^2 (1e8 for a
    # 1 cm Gaussian 100 m away) and float32 leaves noise; the cross product's error is only
    # eps * |o_c| * |d_c|, so distant content stays exact (tests/test_far_field.py).
    c = _cross(oc, dc)
    d2 = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]) / dd
    return dict(diff=diff, oc=oc, dc=dc, dd=dd, od=od, c=c, d2=d2, t_star=-od / dd)


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


# ----------------------------------------------------------------------------------------------
# Production reference: the pair list cut into chunk-sized units, composited many at a time.
#
# Compositing is associative: a tile's list is a sequence of units of `chunk` pairs, and a unit acts on a
# pixel as "T -> T * prod(1 - a)" plus a colour weighted by the incoming T. The units of all tiles lie
# in list order (tile by tile), and one rolled loop walks them `tile_batch` at a time, whatever tiles
# they belong to: per step it evaluates every unit's alphas, gets each unit's incoming transmittance
# from a segmented scan of the units' log products within the step (seeded by the running tile's T
# carried from the previous step), and composites with the stop rule applied against that true
# incoming T. So each pair is evaluated once, the result is the sequential front-to-back walk's (up to
# float rounding), and the work follows the total number of pairs, not the longest tile. The backward
# walks the same steps in reverse, carrying the "everything behind" sums of the running tile.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Units:
    tile: jax.Array  # [U] tile of each unit
    start: jax.Array  # [U] first slot of the unit in the pair list
    offset: jax.Array  # [U] list position of the unit's first pair within its tile
    length: jax.Array  # [U] pairs in the unit (0 past the last unit)
    first: jax.Array  # [U] bool: the tile's first unit
    last: jax.Array  # [U] bool: the tile's last unit
    total: jax.Array  # () units in use


_BIG = 2**30


def _units(tile_start, tile_counts, chunk, pair_capacity):
    """Cuts every tile's range of the pair list into units of `chunk` pairs (a static number of slots:
    capacity / chunk plus one partial unit per tile, plus one spare that is never in use)."""
    n_tiles = tile_counts.shape[0]
    n_units = pair_capacity // chunk + n_tiles + 1
    per_tile = (tile_counts + chunk - 1) // chunk
    end = jnp.cumsum(per_tile)
    u = jnp.arange(n_units, dtype=jnp.int32)
    tile = jnp.clip(jnp.searchsorted(end, u, side="right"), 0, n_tiles - 1).astype(jnp.int32)
    k = u - (end[tile] - per_tile[tile])
    in_use = u < end[-1]
    length = jnp.where(in_use, jnp.clip(tile_counts[tile] - k * chunk, 0, chunk), 0)
    return _Units(
        tile,
        tile_start[tile] + k * chunk,
        k * chunk,
        length,
        in_use & (k == 0),
        in_use & (k == per_tile[tile] - 1),
        end[-1].astype(jnp.int32),
    )


def _segmented_exclusive_sum(x, starts, seed):
    """Exclusive prefix sums of x [B, P] along axis 0 within segments that begin where `starts` [B]; a
    segment continuing from before position 0 (starts[0] False) begins at `seed` [P] (what earlier steps
    carried). No partial sums are subtracted, so a long segment cannot spoil a short one's precision."""
    shifted = jnp.where(starts[:, None], 0.0, jnp.concatenate([seed[None], x[:-1]], 0))

    def op(a, b):
        fa, va = a
        fb, vb = b
        return fa | fb, jnp.where(fb[:, None], vb, va + vb)

    flags = starts | (jnp.arange(x.shape[0]) == 0)
    return jax.lax.associative_scan(op, (flags, shifted))[1]


def _tri(k, dtype, strict):
    """[k, k] matrix M with M[i, j] = 1 where i < j (strict) or i <= j: x @ M is a prefix sum along the last
    axis (a small matmul: XLA:CPU's cumsum is a quadratic reduce-window)."""
    i = jnp.arange(k)
    return ((i[:, None] < i[None, :]) if strict else (i[:, None] <= i[None, :])).astype(dtype)


def _unit_rays(rays_b, fr):
    """rays_b [B, P, F, 6], fr [B, K] -> each pixel's ray in each Gaussian's frame, [B, P, 6, K] (or
    [B, P, 6, 1], broadcasting over K, when the scene has only the world frame)."""
    if rays_b.shape[2] == 1:
        return rays_b[:, :, 0, :, None]
    ray = jnp.moveaxis(jnp.take_along_axis(rays_b, fr[:, None, :, None], axis=2, mode="promise_in_bounds"), 2, 3)
    # Materialised once: fused into eval3d, XLA:CPU would redo the gather and transpose per use.
    return jax.lax.optimization_barrier(ray)


def _components(x, n):
    """[B, K, n] -> n arrays [B, 1, K] (broadcasting over pixels)."""
    return tuple(x[:, None, :, i] for i in range(n))


def _alpha_components(o, d, means, quats, scales, opacities):
    resp, t_star = eval3d_components(o, d, means, quats, scales)
    return alpha_of(resp, t_star, opacities[:, None]), t_star


def _origin_direction(ray):
    """[B, P, 6, K'] -> (origin, direction) component tuples of [B, P, K'] arrays."""
    return tuple(ray[:, :, i] for i in range(3)), tuple(ray[:, :, 3 + i] for i in range(3))


def _unit_alpha(rays_b, fr, means, quats, scales, opacities):
    """rays_b [B, P, F, 6], fr [B, K], params [B, K, ...] -> (alpha, t_star) [B, P, K]."""
    o, d = _origin_direction(_unit_rays(rays_b, fr))
    return _alpha_components(o, d, _components(means, 3), _components(quats, 4), _components(scales, 3), opacities)


def _unit_alpha_vjp(rays_b, fr, means, quats, scales, opacities):
    """`_unit_alpha` and its VJP, written out per component (XLA's autodiff of the component form
    materialises dozens of full-size intermediates; this keeps the per-pixel work to the chain rule's
    few multiply-adds, and takes the per-Gaussian part, M(q, s), through `jax.vjp` on [B, K] arrays).
    `back((g_alpha, g_t))` returns cotangents of (rays_b, means, quats, scales, opacities)."""
    o, d = _origin_direction(_unit_rays(rays_b, fr))
    m, m_vjp = jax.vjp(canonical_matrix, _components(quats, 4), _components(scales, 3))
    ray = _canonical_ray(o, d, _components(means, 3), m)
    diff, oc, dc, c, d2, t_star = (ray[k] for k in ("diff", "oc", "dc", "c", "d2", "t_star"))
    inv_dd = 1.0 / ray["dd"]
    resp = jnp.exp(-0.5 * d2)
    op = opacities[:, None]
    raw = op * resp
    alpha = alpha_of(resp, t_star, op)
    passes = (alpha > 0) & (raw < C.MAX_ALPHA)  # where alpha = opacity * response (not clamped, not cut)

    def back(cot):
        g_alpha, g_t = cot
        g_pre = jnp.where(passes, g_alpha, 0.0)
        g_op = jnp.sum(g_pre * resp, 1)
        g_d2 = -0.5 * raw * g_pre
        k = 2.0 * g_d2 * inv_dd
        g_c = (k * c[0], k * c[1], k * c[2])
        g_dd = -(g_d2 * d2 + g_t * t_star) * inv_dd
        g_od = -g_t * inv_dd
        x = _cross(dc, g_c)
        g_oc = tuple(x[i] + g_od * dc[i] for i in range(3))
        y = _cross(g_c, oc)
        g_dc = tuple(y[i] + g_od * oc[i] + 2.0 * g_dd * dc[i] for i in range(3))
        g_diff = tuple(m[0][j] * g_oc[0] + m[1][j] * g_oc[1] + m[2][j] * g_oc[2] for j in range(3))
        g_d = tuple(m[0][j] * g_dc[0] + m[1][j] * g_dc[1] + m[2][j] * g_dc[2] for j in range(3))
        g_m = tuple(
            tuple(jnp.sum(g_oc[i] * diff[j] + g_dc[i] * d[j], 1, keepdims=True) for j in range(3)) for i in range(3)
        )
        g_q, g_s = m_vjp(g_m)
        if rays_b.shape[2] == 1:  # rays shared by the chunk's Gaussians: sum over them
            d_ray = jnp.stack([jnp.sum(g, -1) for g in g_diff + g_d], -1)[:, :, None, :]
        else:  # each Gaussian's ray came from its frame's: sum per frame (a one-hot matmul, not a scatter)
            ray_cot = jnp.stack(jax.lax.optimization_barrier(g_diff + g_d), axis=2)  # [B, P, 6, K]
            onehot = (fr[:, :, None] == jnp.arange(rays_b.shape[2])).astype(ray_cot.dtype)  # [B, K, F]
            d_ray = jnp.einsum("bpck,bkf->bpfc", ray_cot, onehot)

        def per_k(comps):
            return jnp.stack([x[:, 0] for x in comps], -1)

        g_mean = per_k(tuple(-jnp.sum(g, 1, keepdims=True) for g in g_diff))
        return d_ray, g_mean, per_k(g_q), per_k(g_s), g_op

    return (alpha, t_star), back


def _composite_units(a, log_a, t_in, offset):
    """Front to back through units whose pixels enter with transmittance `t_in` [B, P]; a [B, P, K] is 0
    where nothing is composited, log_a = log1p(-a). A Gaussian that would take T to or below the
    threshold is not added and ends the pixel. Returns (a_eff, T before each, weights, T after the unit,
    stop list position or BIG)."""
    k = a.shape[-1]
    t_after = t_in[..., None] * jnp.exp(log_a @ _tri(k, a.dtype, strict=False))
    stop = t_after <= C.TRANSMITTANCE_THRESHOLD
    any_stop = jnp.any(stop, -1)
    first = jnp.where(any_stop, jnp.argmax(stop, -1), k).astype(jnp.int32)
    live = jnp.arange(k) < first[..., None]
    a_eff = jnp.where(live, a, 0.0)
    # T before each Gaussian from the same prefix (a <= MAX_ALPHA, so the division is well conditioned);
    # past the stop nothing is added and the values there do not matter.
    t_before = t_after / (1.0 - a)
    t_out = t_in * jnp.exp(jnp.sum(jnp.where(live, log_a, 0.0), -1))
    stop_pos = jnp.where(any_stop, offset[:, None] + first, _BIG)
    return a_eff, t_before, a_eff * t_before, t_out, stop_pos


def _gather_step(i, batch, chunk, units, gids, frames, rays, pixel_valid, means, quats, scales, opacities):
    """Units [i * batch, (i + 1) * batch) of the walk: their Gaussians, rays and pixel masks."""
    n_units = units.tile.shape[0]
    u = i * batch + jnp.arange(batch, dtype=jnp.int32)
    ok = u < units.total
    u = jnp.minimum(u, n_units - 1)
    k = jnp.arange(chunk, dtype=jnp.int32)
    g = gids[units.start[u][:, None] + k[None, :]]
    live = (k[None, :] < units.length[u][:, None]) & (g >= 0) & ok[:, None]
    gs = jnp.where(live, g, 0)
    tile = units.tile[u]
    params = (means[gs], quats[gs], scales[gs], jnp.where(live, opacities[gs], 0.0))
    return dict(
        u=u,
        ok=ok,
        gs=gs,
        live=live,
        fr=frames[gs],
        tile=tile,
        rays=rays[tile],
        valid=pixel_valid[tile] & ok[:, None],
        params=params,
    )


def _incoming(log_unit, st, units, carry_tile, carry_log):
    """Log transmittance entering each unit of a step (unstopped products), and the carry for the next."""
    tile = st["tile"]
    prev = jnp.concatenate([carry_tile[None], tile[:-1]])
    log_in = _segmented_exclusive_sum(log_unit, units.first[st["u"]] | (tile != prev), carry_log)
    return log_in, tile[-1], log_in[-1] + log_unit[-1]


def _n_steps(units, batch):
    return (units.total + batch - 1) // batch


def _forward_units(
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
    chunk,
    batch,
    keep_residuals,
):
    n_tiles, n_px = rays.shape[:2]
    dtype = means.dtype
    units = _units(tile_start, tile_counts, chunk, pair_gids.shape[0])
    gids = padded_pairs(pair_gids, chunk)

    def step(i, state):
        rgb, hit, trans, stop_pos, carry_tile, carry_log, log_in_all = state
        st = _gather_step(i, batch, chunk, units, gids, frames, rays, pixel_valid, means, quats, scales, opacities)
        alpha, t_star = _unit_alpha(st["rays"], st["fr"], *st["params"])
        alpha = jnp.where(st["valid"][:, :, None], alpha, 0.0)
        log_a = jnp.log1p(-alpha)
        log_in, carry_tile, carry_log = _incoming(jnp.sum(log_a, -1), st, units, carry_tile, carry_log)
        t_in = jnp.exp(log_in)
        px = ((t_in > C.TRANSMITTANCE_THRESHOLD) & st["valid"])[:, :, None]
        _, _, w, t_out, stop = _composite_units(
            jnp.where(px, alpha, 0.0), jnp.where(px, log_a, 0.0), t_in, units.offset[st["u"]]
        )
        px = px[..., 0]
        tile = st["tile"]
        rgb = rgb.at[tile].add(jnp.einsum("bpk,bkc->bpc", w, colors[st["gs"]]))
        hit = hit.at[tile].add(jnp.sum(w * t_star, -1))
        trans = trans.at[tile].min(jnp.where(px, t_out, 1.0))
        stop_pos = stop_pos.at[tile].min(jnp.where(px, stop, _BIG))
        if keep_residuals:
            log_in_all = jax.lax.dynamic_update_slice_in_dim(log_in_all, log_in, i * batch, 0)
        return rgb, hit, trans, stop_pos, carry_tile, carry_log, log_in_all

    n_steps = _n_steps(units, batch)
    res_rows = units.tile.shape[0] + batch  # every step's rows fit, also the last (padded) step
    init = (
        jnp.zeros((n_tiles, n_px, 3), dtype),
        jnp.zeros((n_tiles, n_px), dtype),
        jnp.ones((n_tiles, n_px), dtype),
        jnp.full((n_tiles, n_px), _BIG, jnp.int32),
        jnp.int32(-1),
        jnp.zeros((n_px,), dtype),
        jnp.zeros((res_rows, n_px) if keep_residuals else (0, n_px), dtype),
    )
    rgb, hit, trans, stop_pos, _, _, log_in_all = jax.lax.fori_loop(0, n_steps, step, init)
    return (rgb, trans, hit), (units, log_in_all, stop_pos)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12))
def _rasterize(
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
    chunk,
    tile_batch,
):
    return _forward_units(
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
        chunk,
        tile_batch,
        keep_residuals=False,
    )[0]


def _rasterize_fwd(
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
    chunk,
    tile_batch,
):
    out, (units, log_in, _) = _forward_units(
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
        chunk,
        tile_batch,
        keep_residuals=True,
    )
    res = (pair_gids, rays, pixel_valid, means, quats, scales, opacities, colors, frames, units, log_in, out[1])
    return out, res


def _rasterize_bwd(chunk, batch, res, cot):
    (pair_gids, rays, pixel_valid, means, quats, scales, opacities, colors, frames, units, log_in_all, trans_final) = (
        res
    )
    g_rgb, g_trans, g_hit = cot
    gids = padded_pairs(pair_gids, chunk)
    n_steps = _n_steps(units, batch)

    def step(r, state):
        carry_tile, carry_behind, d_rays, dm, dq, ds, dop, dcol = state
        i = n_steps - 1 - r  # last step first: "behind" sums flow from the back of each tile's list
        st = _gather_step(i, batch, chunk, units, gids, frames, rays, pixel_valid, means, quats, scales, opacities)
        fr, tile, gs, live = st["fr"], st["tile"], st["gs"], st["live"]
        (alpha, t_star), vjp = _unit_alpha_vjp(st["rays"], fr, *st["params"])
        t_in = jnp.exp(jax.lax.dynamic_slice_in_dim(log_in_all, i * batch, batch, 0))
        px = ((t_in > C.TRANSMITTANCE_THRESHOLD) & st["valid"])[:, :, None]
        a = jnp.where(px, alpha, 0.0)
        a_eff, t_before, w, _, _ = _composite_units(a, jnp.log1p(-a), t_in, units.offset[st["u"]])
        gc = g_rgb[tile]  # [B, P, 3]
        gh = g_hit[tile][..., None]
        own = jnp.einsum("bkc,bpc->bpk", colors[gs], gc) + t_star * gh
        wo = w * own
        # Behind each unit: later units of its tile, this step's (suffix scan) and later steps' (carry).
        nxt = jnp.concatenate([tile[1:], carry_tile[None]])
        ends = units.last[st["u"]] | (tile != nxt)
        behind_units = jnp.flip(
            _segmented_exclusive_sum(jnp.flip(jnp.sum(wo, -1), 0), jnp.flip(ends, 0), carry_behind), 0
        )
        carry_tile, carry_behind = tile[0], behind_units[0] + jnp.sum(wo[0], -1)
        later = wo @ _tri(chunk, wo.dtype, strict=True).T  # later Gaussians of the same unit
        tail = (trans_final * g_trans)[tile]  # through T_final
        kept = a_eff > 0
        d_alpha = t_before * own - (later + (behind_units + tail)[..., None]) / (1.0 - a_eff)
        d_alpha = jnp.where(kept, d_alpha, 0.0)
        d_tstar = jnp.where(kept, w * gh, 0.0)
        d_ray, d_mean, d_quat, d_scale, d_op = vjp((d_alpha, d_tstar))
        d_col = jnp.einsum("bpk,bpc->bkc", w, gc)
        m = live[..., None]
        ok = st["ok"][:, None, None, None]
        return (
            carry_tile,
            carry_behind,
            d_rays.at[tile].add(jnp.where(ok, d_ray, 0.0)),
            dm.at[gs].add(jnp.where(m, d_mean, 0.0)),
            dq.at[gs].add(jnp.where(m, d_quat, 0.0)),
            ds.at[gs].add(jnp.where(m, d_scale, 0.0)),
            dop.at[gs].add(jnp.where(live, d_op, 0.0)),
            dcol.at[gs].add(jnp.where(m, d_col, 0.0)),
        )

    z = jnp.zeros_like
    init = (
        jnp.int32(-1),
        jnp.zeros(rays.shape[1], means.dtype),
        z(rays),
        z(means),
        z(quats),
        z(scales),
        z(opacities),
        z(colors),
    )
    _, _, d_rays, dm, dq, ds, dop, dcol = jax.lax.fori_loop(0, n_steps, step, init)
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
    chunk: int = C.COMPOSITE_CHUNK,
    tile_batch: int = C.COMPOSITE_UNITS_PER_STEP,
):
    """Composites every tile. Returns (rgb [T, P, 3], transmittance [T, P], hit [T, P]).

    Each tile's list is cut into units of `chunk` pairs; `tile_batch` units (of any tiles) are evaluated
    side by side per step (see "Production reference" above).

    Differentiable (custom VJP) with respect to rays, means, quats, scales, opacities and colors.
    """
    return _rasterize(
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
        chunk,
        tile_batch,
    )


# ----------------------------------------------------------------------------------------------
# Autodiff oracle.


def rasterize_tiles_autodiff(
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
    capacity: int,
    chunk: int = 32,
):
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
        alpha, t_star = jax.vmap(_chunk_alpha)(
            jax.vmap(_gather_rays)(rays, frames[gs]), means[gs], quats[gs], scales[gs], op
        )
        alpha = jnp.where(pixel_valid[..., None], alpha, 0.0)
        rgb_add, hit_add, trans, done, _ = composite_chunk(alpha, colors[gs][:, None], t_star, trans, done)
        return (rgb + rgb_add, hit + hit_add, trans, done), None

    init = (
        jnp.zeros((n_tiles, n_px, 3), dtype),
        jnp.zeros((n_tiles, n_px), dtype),
        jnp.ones((n_tiles, n_px), dtype),
        ~pixel_valid,
    )
    (rgb, hit, trans, _), _ = jax.lax.scan(jax.checkpoint(step), init, jnp.arange(n_chunks))
    return rgb, trans, hit
