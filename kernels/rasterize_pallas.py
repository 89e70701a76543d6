"""Per-tile compositing with per-ray 3D Gaussian evaluation: the Pallas (Triton) kernel.

Same signature and results as `rasterize_ref.rasterize_tiles_ref` (its plain-jnp twin). One program
per 16x16 tile walks the tile's depth-sorted Gaussian list in batches of `chunk`, gathers the batch's
parameters by index (Triton vector gathers), evaluates every Gaussian on every pixel's ray in the
Gaussian's own frame (eval3d), and composites front to back with NuRec's constants, stopping a pixel at
the first Gaussian that would take T to or below the threshold and the tile when every pixel is done.

Triton rules respected (jax_pallas.md 1.3): power-of-two blocks, no value slicing (rays arrive as
[8, F, 256] blocks and are read by ref index), no `jnp.any` / `cumprod` (max and exp(cumsum(log1p)) instead).

The backward pass is the reference's reverse walk (`rasterize_ref._rasterize_bwd`), fed with the
kernel's final T, per-pixel stop positions and per-tile batch counts, so the kernel can be isolated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nurec_jax import constants as C
from nurec_jax import math as nmath
from nurec_jax.kernels import _backend, rasterize_ref
from nurec_jax.kernels._backend import plt

_BIG = float(2 ** 30)
_OUT_ROWS = 8  # r, g, b, T, hit, stop position, batches used, (unused)


# Rows of the flat parameter array (one gather with a single index per row).
_MEAN, _MT, _OP, _COL, _ROWS = 0, 3, 12, 13, 16


def _kernel(counts_ref, gids_ref, rays_ref, valid_ref, params_ref, frame_ref, out_ref, *, chunk: int, n_frames: int,
            stride: int):
    t = pl.program_id(0)
    count = counts_ref[t]
    n_px = valid_ref.shape[-1]
    valid = valid_ref[...] > 0.5  # [P]
    # Ray components per frame: rays_ref block [8, F, P] (origin xyz, direction xyz, 2 pad).
    ray = [[rays_ref[c, f, :] for f in range(n_frames)] for c in range(6)]

    def body(state):
        k, c_used, rgb_r, rgb_g, rgb_b, hit, trans, done, stop_pos = state
        pos = k + jnp.arange(chunk)
        gid = gids_ref[t, pl.ds(k, chunk)]
        ok = (gid >= 0) & (pos < count)
        gs = jnp.maximum(gid, 0)
        ld = lambda row: plt.load(params_ref.at[row * stride + gs], mask=ok, other=0.0)  # noqa: E731
        fr = plt.load(frame_ref.at[gs], mask=ok, other=0)
        if n_frames == 1:
            o = [ray[c][0][:, None] for c in range(3)]
            d = [ray[c][0][:, None] for c in range(3, 6)]
        else:
            sel = [(fr == f)[None, :] for f in range(n_frames)]
            o = [sum(jnp.where(sel[f], ray[c][f][:, None], 0.0) for f in range(n_frames)) for c in range(3)]
            d = [sum(jnp.where(sel[f], ray[c][f][:, None], 0.0) for f in range(n_frames)) for c in range(3, 6)]
        diff = [o[j] - ld(_MEAN + j)[None, :] for j in range(3)]  # [P, B]
        m = [[ld(_MT + 3 * j + i)[None, :] for i in range(3)] for j in range(3)]  # m[j][i] = R[j,i] / s_i
        oc = [diff[0] * m[0][i] + diff[1] * m[1][i] + diff[2] * m[2][i] for i in range(3)]
        dc = [d[0] * m[0][i] + d[1] * m[1][i] + d[2] * m[2][i] for i in range(3)]
        dd = dc[0] * dc[0] + dc[1] * dc[1] + dc[2] * dc[2]
        dd = jnp.where(dd > 0, dd, 1.0)  # masked slots load zeros
        od = oc[0] * dc[0] + oc[1] * dc[1] + oc[2] * dc[2]
        oo = oc[0] * oc[0] + oc[1] * oc[1] + oc[2] * oc[2]
        t_star = -od / dd
        resp = jnp.exp(-0.5 * jnp.maximum(oo - od * od / dd, 0.0))
        opac = ld(_OP)[None, :]
        alpha = jnp.minimum(C.MAX_ALPHA, opac * resp)
        keep = (resp > C.MIN_KERNEL_RESPONSE) & (alpha > C.ALPHA_THRESHOLD) & (t_star > 0) & ok[None, :] & \
            valid[:, None] & (done[:, None] < 0.5)
        a = jnp.where(keep, alpha, 0.0)
        t_star = jnp.where(keep, t_star, 0.0)
        log_om = jnp.log1p(-a)
        t_after = trans[:, None] * jnp.exp(jnp.cumsum(log_om, axis=1))
        stop = t_after <= C.TRANSMITTANCE_THRESHOLD
        stopped = jnp.cumsum(stop.astype(jnp.int32), axis=1) > 0
        a_eff = jnp.where(stopped, 0.0, a)
        log_eff = jnp.log1p(-a_eff)
        incl = jnp.cumsum(log_eff, axis=1)
        w = a_eff * trans[:, None] * jnp.exp(incl - log_eff)
        rgb_r = rgb_r + jnp.sum(w * ld(_COL)[None, :], axis=1)
        rgb_g = rgb_g + jnp.sum(w * ld(_COL + 1)[None, :], axis=1)
        rgb_b = rgb_b + jnp.sum(w * ld(_COL + 2)[None, :], axis=1)
        hit = hit + jnp.sum(w * t_star, axis=1)
        trans = trans * jnp.exp(jnp.sum(log_eff, axis=1))
        any_stop = jnp.max(stop.astype(jnp.float32), axis=1) > 0.5
        first = jnp.min(jnp.where(stop, pos[None, :].astype(jnp.float32), _BIG), axis=1)
        newly = any_stop & (done < 0.5)
        stop_pos = jnp.where(newly, first, stop_pos)
        done = jnp.where(any_stop, 1.0, done)
        return k + chunk, c_used + 1, rgb_r, rgb_g, rgb_b, hit, trans, done, stop_pos

    def cond(state):
        k, done = state[0], state[7]
        return (k < count) & (jnp.min(done) < 0.5)

    zeros = jnp.zeros((n_px,), jnp.float32)
    init = (jnp.int32(0), jnp.int32(0), zeros, zeros, zeros, zeros, jnp.ones((n_px,), jnp.float32),
            jnp.where(valid, 0.0, 1.0), jnp.full((n_px,), _BIG, jnp.float32))
    _, c_used, r, g, b, hit, trans, _, stop_pos = jax.lax.while_loop(cond, body, init)
    out_ref[0, :] = r
    out_ref[1, :] = g
    out_ref[2, :] = b
    out_ref[3, :] = trans
    out_ref[4, :] = hit
    out_ref[5, :] = stop_pos
    out_ref[6, :] = jnp.full((n_px,), c_used.astype(jnp.float32))
    out_ref[7, :] = zeros


def _prepare(tile_gids, rays, pixel_valid, means, quats, scales, opacities, colors, frames, chunk):
    n_tiles, cap = tile_gids.shape
    n_px, n_frames = rays.shape[1], rays.shape[2]
    if n_px & (n_px - 1):
        raise ValueError(f"pixels per tile must be a power of two, got {n_px}")
    cap_p = -(-cap // chunk) * chunk + chunk  # a batch read starting at the last slot stays in bounds
    gids = jnp.pad(tile_gids, ((0, 0), (0, cap_p - cap)), constant_values=-1)
    fp = nmath.next_pow2(n_frames)
    r = jnp.moveaxis(rays, (1, 2, 3), (3, 2, 1))  # [T, 6, F, P]
    r = jnp.pad(r, ((0, 0), (0, 2), (0, fp - n_frames), (0, 0))).astype(jnp.float32)
    n = means.shape[0]
    n_p = nmath.next_pow2(max(n, 1))
    pad = lambda x: jnp.pad(x, [(0, n_p - n)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
    mt = nmath.quat_to_matrix(quats) / scales[..., None, :]  # [N, 3, 3], mt[j, i] = R[j, i] / s_i
    rows = jnp.concatenate([means, mt.reshape(n, 9), opacities[:, None], colors, jnp.zeros((n, _ROWS - 16))],
                           axis=1).astype(jnp.float32)  # [N, 16]
    params = pad(rows).T.reshape(-1)  # row r of Gaussian g at r * Np + g
    return gids, r, pixel_valid.astype(jnp.float32), params, pad(frames.astype(jnp.int32)), fp, n_p


def _forward(tile_gids, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors, frames, chunk,
             interpret):
    n_tiles = tile_gids.shape[0]
    n_px = rays.shape[1]
    gids, r, valid, params, fr, fp, n_p = _prepare(tile_gids, rays, pixel_valid, means, quats, scales, opacities,
                                                   colors, frames, chunk)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(_kernel, chunk=chunk, n_frames=fp, stride=n_p)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_tiles, _OUT_ROWS, n_px), jnp.float32),
        grid=(n_tiles,),
        in_specs=[any_spec, any_spec, pl.BlockSpec((None, 8, fp, n_px), lambda t: (t, 0, 0, 0)),
                  pl.BlockSpec((None, n_px), lambda t: (t, 0)), any_spec, any_spec],
        out_specs=pl.BlockSpec((None, _OUT_ROWS, n_px), lambda t: (t, 0, 0)),
        interpret=interpret,
        compiler_params=_backend.compiler_params(num_warps=8),
        name="nurec_rasterize_fwd",
    )(tile_counts.astype(jnp.int32), gids, r, valid, params, fr)
    dtype = means.dtype
    rgb = jnp.moveaxis(out[:, 0:3, :], 1, 2).astype(dtype)
    trans, hit = out[:, 3, :].astype(dtype), out[:, 4, :].astype(dtype)
    stop_pos = jnp.minimum(out[:, 5, :], _BIG).astype(jnp.int32)
    used = out[:, 6, 0].astype(jnp.int32)
    return rgb, trans, hit, stop_pos, used


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12))
def _rasterize(tile_gids, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors, frames, chunk,
               tile_batch, interpret):
    rgb, trans, hit, _, _ = _forward(tile_gids, tile_counts, rays, pixel_valid, means, quats, scales, opacities,
                                     colors, frames, chunk, interpret)
    return rgb, trans, hit


def _rasterize_fwd(tile_gids, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors, frames, chunk,
                   tile_batch, interpret):
    rgb, trans, hit, stop_pos, used = _forward(tile_gids, tile_counts, rays, pixel_valid, means, quats, scales,
                                               opacities, colors, frames, chunk, interpret)
    res = (tile_gids, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors, frames,
           trans, stop_pos, used)
    return (rgb, trans, hit), res


def _rasterize_bwd(chunk, tile_batch, interpret, res, cot):
    # The reference backward: a reverse walk from the kernel's final T, stop positions and batch counts.
    return rasterize_ref._rasterize_bwd(chunk, tile_batch, res, cot)


_rasterize.defvjp(_rasterize_fwd, _rasterize_bwd)


def rasterize_tiles_pallas(tile_gids, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors, frames,
                           *, chunk: int = 32, tile_batch: int = 8, interpret: bool | None = None):
    """Pallas twin of `rasterize_tiles_ref` (same arguments and results; differentiable by custom VJP).

    `chunk` must be a power of two; `interpret` defaults to True off GPU."""
    if chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two for the Triton kernel, got {chunk}")
    return _rasterize(tile_gids, tile_counts, rays, pixel_valid, means, quats, scales, opacities, colors, frames,
                      chunk, tile_batch, _backend.resolve_interpret(interpret))
