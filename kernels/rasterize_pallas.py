"""Per-tile compositing with per-ray 3D Gaussian evaluation: the Pallas (Triton) kernels.

Same signature and results as `rasterize_ref.rasterize_tiles_ref` (its plain-jnp twin), forward and
backward. One program per 16x16 tile (or 16x16 block of lidar rays) walks the tile's range of the
depth-sorted pair list in batches of `chunk`, gathers the batch's parameters by index (Triton vector
gathers), evaluates every Gaussian on every ray in the Gaussian's own frame (eval3d, docs/rendering.md#eval3d)
and composites front to back with NuRec's constants, stopping a ray at the first Gaussian that would take
T to or below the threshold and the tile when every ray is done.

Backward (docs/jax_notes.md#pallas-backward): a second kernel walks the same batches front to back with the same early
exit, recomputing alpha and T exactly, and gets the "everything behind" sums from the forward's final
colour and hit distance (C - P_i), so it needs no reverse walk and no atomics. Per pair slot it stores the
gradient of the 16 flat parameter rows (mean, S^-1 R^T, opacity, colour) into a pair-ordered buffer
(zero-initialised through `input_output_aliases`), which XLA reduces with `segment_sum` by Gaussian id
and chains to quaternions and scales with `jax.vjp`; per ray it accumulates the origin and direction
gradients in every frame.

Triton rules respected (docs/jax_notes.md#triton-rules): power-of-two blocks, no value slicing (rays arrive as
[8, F, 256] blocks and are read by ref index), no `jnp.any` / `cumprod` / sort (max and exp(cumsum(log1p))
instead), gathers and masked stores through single flat indices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nurec_jax import constants as C
from nurec_jax import math as nmath
from nurec_jax.kernels import _backend
from nurec_jax.kernels._backend import plt

_BIG = float(2**30)
_OUT_ROWS = 8  # forward out: r, g, b, T, hit, stop position, batches used, (unused)
# Rows of the flat parameter array (one gather with a single index per row).
_MEAN, _MT, _OP, _COL, _ROWS = 0, 3, 12, 13, 16
# Rows of the backward's per-pixel input: dL/d(r, g, b, T, hit), then the forward's r, g, b, hit.
_COT_ROWS = 16


# ----------------------------------------------------------------------------------------------
# Shared in-kernel math


def _rays(rays_ref, n_frames):
    """Ray components per frame from a [8, F, P] block: ray[c][f] is [P]."""
    return [[rays_ref[c, f, :] for f in range(n_frames)] for c in range(6)]


def _eval_batch(ray, ld, fr, n_frames):
    """eval3d of one batch on every ray of the tile; every array is [P, B] (lists hold components)."""
    if n_frames == 1:
        sel = None
        o = [ray[c][0][:, None] for c in range(3)]
        d = [ray[c][0][:, None] for c in range(3, 6)]
    else:
        sel = [(fr == f)[None, :] for f in range(n_frames)]
        o = [sum(jnp.where(sel[f], ray[c][f][:, None], 0.0) for f in range(n_frames)) for c in range(3)]
        d = [sum(jnp.where(sel[f], ray[c][f][:, None], 0.0) for f in range(n_frames)) for c in range(3, 6)]
    diff = [o[j] - ld(_MEAN + j)[None, :] for j in range(3)]
    m = [[ld(_MT + 3 * j + i)[None, :] for i in range(3)] for j in range(3)]  # m[j][i] = R[j, i] / s_i
    oc = [diff[0] * m[0][i] + diff[1] * m[1][i] + diff[2] * m[2][i] for i in range(3)]
    dc = [d[0] * m[0][i] + d[1] * m[1][i] + d[2] * m[2][i] for i in range(3)]
    dd = dc[0] * dc[0] + dc[1] * dc[1] + dc[2] * dc[2]
    dd = jnp.where(dd > 0, dd, 1.0)  # masked slots load zeros
    od = oc[0] * dc[0] + oc[1] * dc[1] + oc[2] * dc[2]
    # |oc x dc|^2 / dd: no cancellation at street distances (see rasterize_ref.eval3d).
    cr = [oc[1] * dc[2] - oc[2] * dc[1], oc[2] * dc[0] - oc[0] * dc[2], oc[0] * dc[1] - oc[1] * dc[0]]
    d2 = (cr[0] * cr[0] + cr[1] * cr[1] + cr[2] * cr[2]) / dd
    resp = jnp.exp(-0.5 * jnp.maximum(d2, 0.0))
    opac = ld(_OP)[None, :]
    raw = opac * resp
    alpha = jnp.minimum(C.MAX_ALPHA, raw)
    ok = (resp > C.MIN_KERNEL_RESPONSE) & (alpha > C.ALPHA_THRESHOLD) & (-od / dd > 0)
    return dict(
        sel=sel,
        d=d,
        diff=diff,
        m=m,
        oc=oc,
        dc=dc,
        cr=cr,
        dd=dd,
        od=od,
        d2=d2,
        resp=resp,
        opac=opac,
        raw=raw,
        alpha=alpha,
        t_star=-od / dd,
        ok=ok,
    )


def _composite_batch(a, trans):
    """Front-to-back weights of one batch. a [P, B] (0 where not composited), trans [P] before the batch.

    Returns (a_eff, t_before [P, B], w [P, B], trans after, stop [P, B] where T would fall to the threshold)."""
    t_after = trans[:, None] * jnp.exp(jnp.cumsum(jnp.log1p(-a), axis=1))
    stop = t_after <= C.TRANSMITTANCE_THRESHOLD
    stopped = jnp.cumsum(stop.astype(jnp.int32), axis=1) > 0
    a_eff = jnp.where(stopped, 0.0, a)
    log_eff = jnp.log1p(-a_eff)
    t_before = trans[:, None] * jnp.exp(jnp.cumsum(log_eff, axis=1) - log_eff)
    return a_eff, t_before, a_eff * t_before, trans * jnp.exp(jnp.sum(log_eff, axis=1)), stop


def _batch(gids_ref, frame_ref, params_ref, start, count, k, chunk, stride):
    pos = k + jnp.arange(chunk)
    gid = gids_ref[pl.ds(start + k, chunk)]
    live = (gid >= 0) & (pos < count)
    gs = jnp.maximum(gid, 0)
    ld = lambda row: plt.load(params_ref.at[row * stride + gs], mask=live, other=0.0)  # noqa: E731
    fr = plt.load(frame_ref.at[gs], mask=live, other=0)
    return pos, live, ld, fr


# ----------------------------------------------------------------------------------------------
# Forward kernel


def _fwd_kernel(
    start_ref,
    counts_ref,
    gids_ref,
    rays_ref,
    valid_ref,
    params_ref,
    frame_ref,
    out_ref,
    *,
    chunk: int,
    n_frames: int,
    stride: int,
):
    t = pl.program_id(0)
    start, count = start_ref[t], counts_ref[t]
    n_px = valid_ref.shape[-1]
    valid = valid_ref[...] > 0.5  # [P]
    ray = _rays(rays_ref, n_frames)

    def body(state):
        k, c_used, rgb_r, rgb_g, rgb_b, hit, trans, done, stop_pos = state
        pos, live, ld, fr = _batch(gids_ref, frame_ref, params_ref, start, count, k, chunk, stride)
        e = _eval_batch(ray, ld, fr, n_frames)
        keep = e["ok"] & live[None, :] & valid[:, None] & (done[:, None] < 0.5)
        a = jnp.where(keep, e["alpha"], 0.0)
        _, _, w, trans, stop = _composite_batch(a, trans)
        rgb_r = rgb_r + jnp.sum(w * ld(_COL)[None, :], axis=1)
        rgb_g = rgb_g + jnp.sum(w * ld(_COL + 1)[None, :], axis=1)
        rgb_b = rgb_b + jnp.sum(w * ld(_COL + 2)[None, :], axis=1)
        hit = hit + jnp.sum(w * jnp.where(keep, e["t_star"], 0.0), axis=1)
        any_stop = jnp.max(stop.astype(jnp.float32), axis=1) > 0.5
        first = jnp.min(jnp.where(stop, pos[None, :].astype(jnp.float32), _BIG), axis=1)
        stop_pos = jnp.where(any_stop & (done < 0.5), first, stop_pos)
        done = jnp.where(any_stop, 1.0, done)
        return k + chunk, c_used + 1, rgb_r, rgb_g, rgb_b, hit, trans, done, stop_pos

    def cond(state):
        k, done = state[0], state[7]
        return (k < count) & (jnp.min(done) < 0.5)

    zeros = jnp.zeros((n_px,), jnp.float32)
    init = (
        jnp.int32(0),
        jnp.int32(0),
        zeros,
        zeros,
        zeros,
        zeros,
        jnp.ones((n_px,), jnp.float32),
        jnp.where(valid, 0.0, 1.0),
        jnp.full((n_px,), _BIG, jnp.float32),
    )
    _, c_used, r, g, b, hit, trans, _, stop_pos = jax.lax.while_loop(cond, body, init)
    out_ref[0, :] = r
    out_ref[1, :] = g
    out_ref[2, :] = b
    out_ref[3, :] = trans
    out_ref[4, :] = hit
    out_ref[5, :] = stop_pos
    out_ref[6, :] = jnp.full((n_px,), c_used.astype(jnp.float32))
    out_ref[7, :] = zeros


# ----------------------------------------------------------------------------------------------
# Backward kernel


def _bwd_kernel(
    start_ref,
    counts_ref,
    used_ref,
    gids_ref,
    rays_ref,
    valid_ref,
    cot_ref,
    params_ref,
    frame_ref,
    zeros_ref,
    dray_ref,
    dparam_ref,
    *,
    chunk: int,
    n_frames: int,
    stride: int,
    slots: int,
):
    del zeros_ref  # aliased to dparam_ref: zero-initialises the slots this walk never reaches
    t = pl.program_id(0)
    start, count, n_used = start_ref[t], counts_ref[t], used_ref[t]
    n_px = valid_ref.shape[-1]
    valid = valid_ref[...] > 0.5
    ray = _rays(rays_ref, n_frames)
    g_col = [cot_ref[c, :] for c in range(3)]
    g_trans, g_hit = cot_ref[3, :], cot_ref[4, :]
    final_col = [cot_ref[8 + c, :] for c in range(3)]
    final_hit, final_trans, stop_pos = cot_ref[11, :], cot_ref[12, :], cot_ref[13, :]
    # Gradient of everything composited behind the current Gaussian, through T: -(C - P_i).gC - (H - Ph_i) gH
    # - T_f gT, divided by (1 - a_i); "behind" sums come from the final values minus the running prefix.
    g_behind_total = final_col[0] * g_col[0] + final_col[1] * g_col[1] + final_col[2] * g_col[2] + final_hit * g_hit

    def body(state):
        c, trans, prefix, g_ray = state
        k = c * chunk
        pos, live, ld, fr = _batch(gids_ref, frame_ref, params_ref, start, count, k, chunk, stride)
        e = _eval_batch(ray, ld, fr, n_frames)
        keep = e["ok"] & live[None, :] & valid[:, None] & (pos[None, :].astype(jnp.float32) < stop_pos[:, None])
        a = jnp.where(keep, e["alpha"], 0.0)
        _, t_before, w, trans, _ = _composite_batch(a, trans)
        col = [ld(_COL + c3)[None, :] for c3 in range(3)]
        t_star = jnp.where(keep, e["t_star"], 0.0)
        own = (
            col[0] * g_col[0][:, None]
            + col[1] * g_col[1][:, None]
            + col[2] * g_col[2][:, None]
            + t_star * g_hit[:, None]
        )  # [P, B]
        incl = prefix[:, None] + jnp.cumsum(w * own, axis=1)  # P_i . g, inclusive
        behind = g_behind_total[:, None] - incl
        d_alpha = t_before * own - (behind + (final_trans * g_trans)[:, None]) / (1.0 - a)
        d_alpha = jnp.where(keep, d_alpha, 0.0)
        d_tstar = jnp.where(keep, w * g_hit[:, None], 0.0)
        # alpha = min(MAX_ALPHA, opacity * resp); resp = exp(-d2 / 2); t* = -od / dd.
        unclamped = e["raw"] < C.MAX_ALPHA
        d_op = jnp.where(unclamped, d_alpha * e["resp"], 0.0)
        d_d2 = jnp.where(unclamped & (e["d2"] > 0), -0.5 * d_alpha * e["opac"] * e["resp"], 0.0)
        inv = 1.0 / e["dd"]
        r = e["od"] * inv
        oc, dc, cr = e["oc"], e["dc"], e["cr"]
        # d2 = |c|^2 / dd with c = oc x dc: d(d2)/d(oc) = 2 p and d(d2)/d(dc) = -2 r p, where p = oc - r dc
        # (the offset of the closest point from the centre) is taken as (dc x c) / dd, which does not cancel.
        p = [
            (dc[1] * cr[2] - dc[2] * cr[1]) * inv,
            (dc[2] * cr[0] - dc[0] * cr[2]) * inv,
            (dc[0] * cr[1] - dc[1] * cr[0]) * inv,
        ]
        g_oc = [d_d2 * 2 * p[i] - d_tstar * dc[i] * inv for i in range(3)]
        g_dc = [-d_d2 * 2 * r * p[i] + d_tstar * (2 * r * inv * dc[i] - oc[i] * inv) for i in range(3)]
        m = e["m"]
        g_diff = [g_oc[0] * m[j][0] + g_oc[1] * m[j][1] + g_oc[2] * m[j][2] for j in range(3)]  # [P, B]
        g_dir = [g_dc[0] * m[j][0] + g_dc[1] * m[j][1] + g_dc[2] * m[j][2] for j in range(3)]
        rows = [-jnp.sum(g_diff[j], axis=0) for j in range(3)]
        rows += [jnp.sum(e["diff"][j] * g_oc[i] + e["d"][j] * g_dc[i], axis=0) for j in range(3) for i in range(3)]
        rows += [jnp.sum(d_op, axis=0)]
        rows += [jnp.sum(w * g_col[c3][:, None], axis=0) for c3 in range(3)]
        in_tile = pos < count
        slot = start + pos
        for row, v in enumerate(rows):  # dparam is [16 * slots] flat: row r of pair slot s at r * slots + s
            plt.store(dparam_ref.at[row * slots + slot], v, mask=in_tile)
        grads = g_diff + g_dir
        if n_frames == 1:
            g_ray = [[g_ray[c3][0] + jnp.sum(grads[c3], axis=1)] for c3 in range(6)]
        else:
            g_ray = [
                [g_ray[c3][f] + jnp.sum(jnp.where(e["sel"][f], grads[c3], 0.0), axis=1) for f in range(n_frames)]
                for c3 in range(6)
            ]
        return c + 1, trans, prefix + jnp.sum(w * own, axis=1), g_ray

    zeros = jnp.zeros((n_px,), jnp.float32)
    init = (jnp.int32(0), jnp.ones((n_px,), jnp.float32), zeros, [[zeros] * n_frames for _ in range(6)])
    _, _, _, g_ray = jax.lax.while_loop(lambda s: s[0] < n_used, body, init)
    for c3 in range(6):
        for f in range(n_frames):
            dray_ref[c3, f, :] = g_ray[c3][f]
    for c3 in (6, 7):
        for f in range(n_frames):
            dray_ref[c3, f, :] = zeros


# ----------------------------------------------------------------------------------------------
# Host-side preparation and the custom VJP


def _param_rows(means, quats, scales, opacities, colors):
    """[N, 16] float32 rows: mean, S^-1 R^T (as mt[j, i] = R[j, i] / s_i), opacity, colour."""
    n = means.shape[0]
    mt = nmath.quat_to_matrix(quats) / scales[..., None, :]
    return jnp.concatenate([means, mt.reshape(n, 9), opacities[:, None], colors], axis=1).astype(jnp.float32)


def _layout(pair_gids, rays, pixel_valid, rows, frames, chunk):
    n_px, n_frames = rays.shape[1], rays.shape[2]
    if n_px & (n_px - 1):
        raise ValueError(f"pixels per tile must be a power of two, got {n_px}")
    gids = jnp.pad(pair_gids, (0, chunk), constant_values=-1)  # a batch read at the last pair stays in bounds
    fp = nmath.next_pow2(n_frames)
    r = jnp.moveaxis(rays, (1, 2, 3), (3, 2, 1))  # [T, 6, F, P]
    r = jnp.pad(r, ((0, 0), (0, 2), (0, fp - n_frames), (0, 0))).astype(jnp.float32)
    n = rows.shape[0]
    n_p = nmath.next_pow2(max(n, 1))
    params = jnp.pad(rows, ((0, n_p - n), (0, 0))).T.reshape(-1)  # row r of Gaussian g at r * Np + g
    fr = jnp.pad(frames.astype(jnp.int32), (0, n_p - n))
    return gids, r, pixel_valid.astype(jnp.float32), params, fr, fp, n_p


_ANY = dict(memory_space=pl.ANY)


def _forward(pair_gids, tile_start, tile_counts, rays, pixel_valid, rows, frames, chunk, interpret):
    n_tiles, n_px = rays.shape[:2]
    gids, r, valid, params, fr, fp, n_p = _layout(pair_gids, rays, pixel_valid, rows, frames, chunk)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, chunk=chunk, n_frames=fp, stride=n_p),
        out_shape=jax.ShapeDtypeStruct((n_tiles, _OUT_ROWS, n_px), jnp.float32),
        grid=(n_tiles,),
        in_specs=[
            pl.BlockSpec(**_ANY),
            pl.BlockSpec(**_ANY),
            pl.BlockSpec(**_ANY),
            pl.BlockSpec((None, 8, fp, n_px), lambda t: (t, 0, 0, 0)),
            pl.BlockSpec((None, n_px), lambda t: (t, 0)),
            pl.BlockSpec(**_ANY),
            pl.BlockSpec(**_ANY),
        ],
        out_specs=pl.BlockSpec((None, _OUT_ROWS, n_px), lambda t: (t, 0, 0)),
        interpret=interpret,
        compiler_params=_backend.compiler_params(num_warps=8),
        name="nurec_rasterize_fwd",
    )(tile_start.astype(jnp.int32), tile_counts.astype(jnp.int32), gids, r, valid, params, fr)
    rgb = jnp.moveaxis(out[:, 0:3, :], 1, 2)
    trans, hit = out[:, 3, :], out[:, 4, :]
    stop_pos = jnp.minimum(out[:, 5, :], _BIG).astype(jnp.int32)
    used = out[:, 6, 0].astype(jnp.int32)
    return rgb, trans, hit, stop_pos, used


def _backward(
    pair_gids,
    tile_start,
    tile_counts,
    used,
    rays,
    pixel_valid,
    rows,
    frames,
    rgb,
    trans,
    hit,
    stop_pos,
    g_rgb,
    g_trans,
    g_hit,
    chunk,
    interpret,
):
    """Gradients of the flat parameter rows [N, 16] and of the rays [T, P, F, 6]."""
    n_tiles, n_px, n_frames = rays.shape[:3]
    gids, r, valid, params, fr, fp, n_p = _layout(pair_gids, rays, pixel_valid, rows, frames, chunk)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    zero = jnp.zeros((n_tiles, n_px), jnp.float32)
    cot = jnp.stack(
        [
            f32(g_rgb[..., 0]),
            f32(g_rgb[..., 1]),
            f32(g_rgb[..., 2]),
            f32(g_trans),
            f32(g_hit),
            zero,
            zero,
            zero,
            f32(rgb[..., 0]),
            f32(rgb[..., 1]),
            f32(rgb[..., 2]),
            f32(hit),
            f32(trans),
            jnp.minimum(stop_pos, 2**30).astype(jnp.float32),
            zero,
            zero,
        ],
        axis=1,
    )  # [T, 16, P]
    m_pad = gids.shape[0]
    dray, dparam = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=chunk, n_frames=fp, stride=n_p, slots=m_pad),
        out_shape=(
            jax.ShapeDtypeStruct((n_tiles, 8, fp, n_px), jnp.float32),
            jax.ShapeDtypeStruct((_ROWS * m_pad,), jnp.float32),
        ),
        grid=(n_tiles,),
        in_specs=[
            pl.BlockSpec(**_ANY),
            pl.BlockSpec(**_ANY),
            pl.BlockSpec(**_ANY),
            pl.BlockSpec(**_ANY),
            pl.BlockSpec((None, 8, fp, n_px), lambda t: (t, 0, 0, 0)),
            pl.BlockSpec((None, n_px), lambda t: (t, 0)),
            pl.BlockSpec((None, _COT_ROWS, n_px), lambda t: (t, 0, 0)),
            pl.BlockSpec(**_ANY),
            pl.BlockSpec(**_ANY),
            pl.BlockSpec(**_ANY),
        ],
        out_specs=(pl.BlockSpec((None, 8, fp, n_px), lambda t: (t, 0, 0, 0)), pl.BlockSpec(**_ANY)),
        input_output_aliases={9: 1},
        interpret=interpret,
        compiler_params=_backend.compiler_params(num_warps=8),
        name="nurec_rasterize_bwd",
    )(
        tile_start.astype(jnp.int32),
        tile_counts.astype(jnp.int32),
        used.astype(jnp.int32),
        gids,
        r,
        valid,
        cot,
        params,
        fr,
        jnp.zeros((_ROWS * m_pad,), jnp.float32),
    )
    n = rows.shape[0]
    seg = jnp.where(gids >= 0, gids, n)
    d_rows = jax.ops.segment_sum(dparam.reshape(_ROWS, m_pad).T, seg, num_segments=n + 1)[:n]
    d_rays = jnp.moveaxis(dray[:, :6, :n_frames, :], (1, 2, 3), (3, 2, 1))  # [T, P, F, 6]
    return d_rows, d_rays


@functools.partial(jax.custom_vjp, nondiff_argnums=(11, 12, 13))
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
    interpret,
):
    return _rasterize_fwd(
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
        interpret,
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
    interpret,
):
    del tile_batch
    rows = _param_rows(means, quats, scales, opacities, colors)
    rgb, trans, hit, stop_pos, used = _forward(
        pair_gids, tile_start, tile_counts, rays, pixel_valid, rows, frames, chunk, interpret
    )
    dtype = means.dtype
    out = (rgb.astype(dtype), trans.astype(dtype), hit.astype(dtype))
    res = (
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
        rgb,
        trans,
        hit,
        stop_pos,
        used,
    )
    return out, res


def _rasterize_bwd(chunk, tile_batch, interpret, res, cot):
    del tile_batch
    (
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
        rgb,
        trans,
        hit,
        stop_pos,
        used,
    ) = res
    rows, rows_vjp = jax.vjp(_param_rows, means, quats, scales, opacities, colors)
    d_rows, d_rays = _backward(
        pair_gids,
        tile_start,
        tile_counts,
        used,
        rays,
        pixel_valid,
        rows,
        frames,
        rgb,
        trans,
        hit,
        stop_pos,
        *cot,
        chunk,
        interpret,
    )
    dm, dq, ds, dop, dcol = rows_vjp(d_rows)
    return (None, None, None, d_rays.astype(rays.dtype), None, dm, dq, ds, dop, dcol, None)


_rasterize.defvjp(_rasterize_fwd, _rasterize_bwd)


def rasterize_tiles_pallas(
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
    chunk: int = 32,
    tile_batch: int = 8,
    interpret: bool | None = None,
):
    """Pallas twin of `rasterize_tiles_ref` (same arguments and results; differentiable by custom VJP whose
    backward is the backward kernel).

    `chunk` must be a power of two; `tile_batch` is the reference's and is ignored here; `interpret`
    defaults to True off GPU."""
    if chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two for the Triton kernels, got {chunk}")
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
        _backend.resolve_interpret(interpret),
    )
