"""Lidar ray casting through the Gaussians (plain-jnp reference path).

One ray per (beam, column) of a `LidarModel`, each at its own time inside the spin: the sensor pose
is interpolated between the request's start and end poses (lerp + slerp), and actors are posed at
the same time, so a moving lidar shows real motion skew. Rays are grouped into 8x8 "tiles"
(C.LIDAR_TILE_SIZE) of the range image (beams sorted by elevation x consecutive columns); each Gaussian
is binned to the tiles its angular extent (3.33 sigma, opacity-aware, widened by the motion during the
columns that see it, see `_footprints`) covers, with the azimuth wrap-around of a 360-degree lidar
handled by a second copy. Each tile's list is sorted by distance and
composited with the camera renderer's compositor (`rasterize_tiles_ref`: eval3d at the maximum response
on each ray, the same alpha / transmittance constants, custom VJP).

Per ray: alpha = 1 - T, expected distance d = sum(w t*) / alpha, intensity = sum(w i) / alpha. The
point is o + d dir (world, at the ray's time), returned in the end-of-spin lidar frame. Differentiable
with respect to the sensor poses (and Gaussian parameters); binning runs under stop_gradient.
Spins are processed in passes of whole column tiles, so memory is bounded by `LidarOptions`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from nurec_jax import constants as C
from nurec_jax import sh as sh_lib
from nurec_jax.binning import bin_gaussians
from nurec_jax.compositing import composite_tiles
from nurec_jax.frames import ActorPoses, frame_pairs, merge_gaussians
from nurec_jax.lidar_models import LidarModel
from nurec_jax.poses import Pose, PosePair
from nurec_jax.projection import extent_sigmas
from nurec_jax.types import SceneGaussians, static_field

_SQRT_TILE = C.LIDAR_TILE_SIZE  # rays per tile side (beams x columns)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LidarTables:
    """Device tables of a lidar model, beams sorted by elevation (descending) and padded to
    a multiple of the tile side.

    Attributes:
      elevations, offsets: (Rp,) per sorted beam; padding beams have elevation -10 rad.
      ring: (Rp,) int32 original beam (ring) index; -1 for padding.
      azimuths: (Cp,) column azimuths, padded.
    """

    elevations: jax.Array
    offsets: jax.Array
    ring: jax.Array
    azimuths: jax.Array
    rows: int = static_field()
    columns: int = static_field()
    az0: float = static_field()
    step: float = static_field()
    full_circle: bool = static_field()
    max_offset: float = static_field()
    min_range: float = static_field()
    max_range: float = static_field()

    @property
    def rows_padded(self) -> int:
        return self.elevations.shape[0]

    @property
    def column_tiles(self) -> int:
        return -(-self.columns // _SQRT_TILE)


def lidar_tables(model: LidarModel, dtype=jnp.float32) -> LidarTables:
    order = np.argsort(-model.elevations_rad, kind="stable")
    rp = -(-model.rows // _SQRT_TILE) * _SQRT_TILE
    cp = -(-model.columns // _SQRT_TILE) * _SQRT_TILE
    elev = np.full(rp, -10.0)
    elev[: model.rows] = model.elevations_rad[order]
    off = np.zeros(rp)
    off[: model.rows] = model.row_azimuth_offsets_rad[order]
    ring = np.full(rp, -1, np.int32)
    ring[: model.rows] = order
    az = np.zeros(cp)
    az[: model.columns] = model.column_azimuths_rad
    return LidarTables(
        jnp.asarray(elev, dtype),
        jnp.asarray(off, dtype),
        jnp.asarray(ring),
        jnp.asarray(az, dtype),
        model.rows,
        model.columns,
        float(model.column_azimuths_rad[0]),
        model.azimuth_step,
        model.full_circle,
        float(np.max(np.abs(model.row_azimuth_offsets_rad))),
        model.min_range_m,
        model.max_range_m,
    )


@dataclasses.dataclass(frozen=True)
class LidarOptions:
    """Static configuration of the lidar ray caster (part of the jit key).

    Attributes:
      pair_capacity: (tile, Gaussian) pair buffer of one pass.
      column_tiles: column tiles (C.LIDAR_TILE_SIZE columns each) per pass; 0 = the whole spin in one pass.
      chunk, tile_batch: compositor settings (as RenderOptions).
      implementation: compositor (as RenderOptions).
      motion_bound: how binning bounds motion during the spin: "tight" (over the columns that see each
        Gaussian) or "spin" (over the whole spin; looser, for checks). See `_footprints`.
    """

    pair_capacity: int = C.PAIR_CAPACITY
    column_tiles: int = 0
    chunk: int = C.COMPOSITE_CHUNK
    tile_batch: int = C.COMPOSITE_UNITS_PER_STEP
    implementation: str = "auto"
    motion_bound: str = "tight"


def column_tiles_for(tables: LidarTables, ray_chunk_size: int) -> int:
    """Column tiles per pass so that a pass holds at most `ray_chunk_size` rays (at least one tile)."""
    per_tile = tables.rows_padded * _SQRT_TILE
    return int(max(1, min(tables.column_tiles, ray_chunk_size // per_tile)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LidarPass:
    """One pass (a block of columns) of a spin; arrays are (Rp, n) with beams sorted by elevation."""

    distance: jax.Array  # expected distance along the ray (0 where alpha ~ 0)
    alpha: jax.Array
    intensity: jax.Array  # in [0, 1]
    points: jax.Array  # (Rp, n, 3) in the end-of-spin lidar frame
    valid: jax.Array  # (Rp, n) the ray exists (not padding)
    num_pairs: jax.Array
    max_tile_pairs: jax.Array


def gaussian_intensity(gaussians: SceneGaussians) -> jax.Array:
    """Per-Gaussian lidar intensity: the scene's lidar feature where it has one, else the fallback
    (the luminance of the Gaussian's view-independent colour), static then dynamic, in [0, 1]."""

    def one(g, stored):
        rgb = jnp.clip(0.5 + sh_lib.C0 * g.sh[:, 0, :], 0.0, 1.0)
        fallback = rgb @ jnp.asarray([0.2126, 0.7152, 0.0722], rgb.dtype)
        if stored is None:
            return fallback
        return jnp.clip(jnp.where(jnp.isnan(stored), fallback, stored.astype(rgb.dtype)), 0.0, 1.0)

    return jnp.concatenate(
        [one(gaussians.static, gaussians.static_intensity), one(gaussians.dynamic, gaussians.dynamic_intensity)]
    )


def _angle_between(r0, r1):
    c = (jnp.trace(r0.T @ r1) - 1.0) * 0.5
    return jnp.arccos(jnp.clip(c, -1.0, 1.0))


def _angular_window(p_s, extent, turn, tables: LidarTables):
    """Rows and (unwrapped, fractional) columns a sphere of radius `extent` around the sensor-frame point
    p_s [N, 3] can be seen in, widened by `turn` radians of sensor rotation. Returns
    (row_lo, row_hi, u_lo, u_hi, full, r)."""
    r = jnp.linalg.norm(p_s, axis=-1)
    inside = extent >= r * 0.999
    rho = jnp.where(inside, math.pi, jnp.arcsin(jnp.clip(extent / jnp.maximum(r, 1e-9), 0.0, 1.0))) + turn
    beta_g = jnp.arctan2(p_s[:, 1], p_s[:, 0])
    alpha_g = jnp.arctan2(p_s[:, 2], jnp.linalg.norm(p_s[:, :2], axis=-1))
    # Beam (row) range: sorted elevations are descending.
    neg = -tables.elevations
    row_lo = jnp.searchsorted(neg, -(alpha_g + rho), side="left")
    row_hi = jnp.searchsorted(neg, -(alpha_g - rho), side="right") - 1
    # Column range from the azimuth interval.
    polar = (jnp.abs(alpha_g) + rho) >= (math.pi / 2 - 1e-3)
    rho_az = jnp.where(
        polar | inside,
        math.pi,
        jnp.arcsin(jnp.clip(jnp.sin(jnp.minimum(rho, math.pi / 2)) / jnp.maximum(jnp.cos(alpha_g), 1e-6), 0.0, 1.0)),
    )
    rho_az = rho_az + tables.max_offset
    beta_c = _unwrapped(beta_g, tables)
    u_a = (beta_c - rho_az - tables.az0) / tables.step
    u_b = (beta_c + rho_az - tables.az0) / tables.step
    return row_lo, row_hi, jnp.minimum(u_a, u_b), jnp.maximum(u_a, u_b), rho_az >= math.pi, r


def _unwrapped(beta, tables: LidarTables):
    """Azimuth `beta` unwrapped to within half a turn of the centre of the lidar's columns."""
    centre = tables.az0 + 0.5 * tables.step * (tables.columns - 1)
    return centre + jnp.mod(beta - centre + math.pi, 2 * math.pi) - math.pi


def _footprints(g, tables: LidarTables, sensor_pose: PosePair, frames: PosePair, motion_bound: str):
    """Each Gaussian's beam rows and column interval (no gradients).

    A ray at column c is cast at spin time tau_c = c / (C - 1). Bounding a Gaussian by the sensor's and
    its actor's motion over the whole spin ("spin") is safe but loose: 1 m of ego motion per spin widens a
    Gaussian 5 m away by 11 degrees. "tight" (the default) finds the time tau* the sweep passes the
    Gaussian (the fixed point tau = column(azimuth of the centre at tau) / (C - 1), as a rolling shutter),
    and bounds the motion only over the columns its window spans around tau*: with the window
    W = 2 (w0 + 1) + residual columns (w0: the half-width without motion), the motion margin is the
    spin's motion times W / (C - 1); where the widened window does not fit in W, or a full-circle window
    could cross the seam (where tau jumps from 1 to 0: columns at the far end see it a spin later) under
    the whole-spin bound, that bound is kept.

    Sort keys stay the distance at mid-spin in both modes (order decides which Gaussian a saturating ray
    stops at, so the two modes give the same rays).

    Returns (row_lo, row_hi, u_lo, u_hi, wrap_copy, r, extent).
    """
    dtype = g.means.dtype
    pick = lambda p: Pose(p.quat[g.frames], p.trans[g.frames])  # noqa: E731
    f_pair = PosePair(pick(frames.start), pick(frames.end))
    actor_motion = jnp.linalg.norm(f_pair.end.apply(g.means) - f_pair.start.apply(g.means), axis=-1)
    sensor_motion = jnp.linalg.norm(sensor_pose.end.trans - sensor_pose.start.trans)
    sensor_turn = _angle_between(sensor_pose.start.rotation(), sensor_pose.end.rotation())
    extent0 = extent_sigmas(g.opacities) * jnp.max(g.scales, -1)
    motion = actor_motion + sensor_motion

    def seen_at(tau):  # sensor-frame centres at per-Gaussian times tau [N]
        return sensor_pose.at(tau).inverse().apply(f_pair.at(tau).apply(g.means))

    n = g.means.shape[0]
    # Whole-spin bound around the mid-spin position.
    s_ext = extent0 + motion
    s_lo, s_hi, s_ulo, s_uhi, s_full, s_r = _angular_window(
        seen_at(jnp.full((n,), 0.5, dtype)), s_ext, sensor_turn, tables
    )
    if motion_bound == "spin":
        return _wrapped(tables, s_lo, s_hi, s_ulo, s_uhi, s_full) + (s_r, s_ext)
    if motion_bound != "tight":
        raise ValueError(f"motion_bound must be 'tight' or 'spin', got {motion_bound!r}")
    last = max(tables.columns - 1, 1)

    def column_of(p_s):
        return (_unwrapped(jnp.arctan2(p_s[:, 1], p_s[:, 0]), tables) - tables.az0) / tables.step

    tau = jnp.full((n,), 0.5, dtype)
    for _ in range(C.LIDAR_SWEEP_ITERATIONS):
        tau = jnp.clip(column_of(seen_at(tau)) / last, 0.0, 1.0)
    p_s = seen_at(tau)
    c_app = column_of(p_s)
    residual = jnp.abs(c_app - tau * last)
    w0 = _angular_window(p_s, extent0, 0.0, tables)
    half0 = 0.5 * (w0[3] - w0[2])
    window = 2.0 * (half0 + 1.0) + residual
    dtau = jnp.minimum(window / last, 1.0)
    ext = extent0 + motion * dtau
    t_lo, t_hi, t_ulo, t_uhi, t_full, t_r = _angular_window(p_s, ext, sensor_turn * dtau, tables)
    fits = (0.5 * (t_uhi - t_ulo) + residual <= window) & ~t_full & ~w0[4]
    if tables.full_circle:  # near the seam, columns at the other end see the Gaussian a spin later
        fits = fits & (s_ulo >= 0.0) & (s_uhi <= tables.columns - 1.0) & ~s_full
    sel = lambda a, b: jnp.where(fits, a, b)  # noqa: E731
    return _wrapped(tables, sel(t_lo, s_lo), sel(t_hi, s_hi), sel(t_ulo, s_ulo), sel(t_uhi, s_uhi), ~fits & s_full) + (
        s_r,
        sel(ext, s_ext),
    )


def _wrapped(tables: LidarTables, row_lo, row_hi, u_lo, u_hi, full):
    """Column intervals folded into one period of a full-circle lidar; `wrap_copy` marks Gaussians whose
    interval runs past the last column and is binned a second time one period earlier."""
    wrap_copy = jnp.zeros_like(full)
    if tables.full_circle:
        period = 2 * math.pi / abs(tables.step)
        shift = jnp.floor(u_lo / period) * period
        u_lo, u_hi = u_lo - shift, u_hi - shift
        u_lo = jnp.where(full, 0.0, u_lo)
        u_hi = jnp.where(full, tables.columns - 1.0, u_hi)
        wrap_copy = ~full & (u_hi >= period - 1.0)
    return row_lo, row_hi, u_lo, u_hi, wrap_copy


def raycast_pass(
    gaussians: SceneGaussians,
    tables: LidarTables,
    sensor_pose: PosePair,
    actors: ActorPoses,
    col_tile0: jax.Array,
    n_col_tiles: int,
    options: LidarOptions,
) -> LidarPass:
    """Casts the rays of column tiles [col_tile0, col_tile0 + n_col_tiles) of one spin."""
    dtype = gaussians.static.means.dtype
    sg = jax.lax.stop_gradient
    rp, nc = tables.rows_padded, n_col_tiles * _SQRT_TILE
    frames = frame_pairs(actors, dtype)
    g = merge_gaussians(gaussians, actors)
    n = g.means.shape[0]

    with jax.named_scope("rays"):
        col0 = col_tile0 * _SQRT_TILE
        cols = col0 + jnp.arange(nc)
        col_ok = cols < tables.columns
        az = tables.azimuths[jnp.clip(cols, 0, tables.azimuths.shape[0] - 1)]
        tau = (jnp.clip(cols, 0, tables.columns - 1) / max(tables.columns - 1, 1)).astype(dtype)
        pose = sensor_pose.at(tau)  # [nc]
        rot, trans = pose.rotation(), pose.trans
        elev = tables.elevations[:, None]
        beta = az[None, :] + tables.offsets[:, None]
        d_s = jnp.stack(
            [jnp.cos(beta) * jnp.cos(elev), jnp.sin(beta) * jnp.cos(elev), jnp.broadcast_to(jnp.sin(elev), beta.shape)],
            -1,
        )  # [Rp, nc, 3]
        d_w = jnp.einsum("cij,rcj->rci", rot, d_s)
        o_w = jnp.broadcast_to(trans[None], d_w.shape)
        valid = (tables.ring[:, None] >= 0) & col_ok[None, :]
        n_frames = frames.start.quat.shape[0]
        if n_frames == 1:
            rays = jnp.concatenate([o_w, d_w], -1)[:, :, None, :]
        else:
            inv = frames.at(jnp.broadcast_to(tau[:, None], (nc, n_frames))).inverse()  # [nc, F]
            ri, ti = inv.rotation(), inv.trans
            o_f = jnp.einsum("cfij,rcj->rcfi", ri, o_w) + ti[None]
            d_f = jnp.einsum("cfij,rcj->rcfi", ri, d_w)
            rays = jnp.concatenate([o_f, d_f], -1)  # [Rp, nc, F, 6]
        ty, tx = rp // _SQRT_TILE, n_col_tiles

        def tile(x):
            x = x.reshape((ty, _SQRT_TILE, tx, _SQRT_TILE) + x.shape[2:])
            x = jnp.moveaxis(x, 2, 1)
            return x.reshape((ty * tx, _SQRT_TILE * _SQRT_TILE) + x.shape[4:])

        rays_t, valid_t = tile(rays), tile(valid)

    with jax.named_scope("bin"):
        row_lo, row_hi, u_lo, u_hi, wrap_copy, r, extent = _footprints(
            jax.tree_util.tree_map(sg, g), tables, sg(sensor_pose), sg(frames), options.motion_bound
        )
        opac = sg(g.opacities)
        x_lo = jnp.floor(u_lo) - col0
        x_hi = jnp.ceil(u_hi) - col0
        y_lo, y_hi = row_lo.astype(dtype), row_hi.astype(dtype)
        ok = (row_hi >= row_lo) & (r - extent < tables.max_range * 1.05) & (r > 1e-6) & (opac >= C.ALPHA_THRESHOLD)
        if tables.full_circle:
            shift_c = 2 * math.pi / abs(tables.step)
            rect_lo = jnp.concatenate([jnp.stack([x_lo, y_lo], -1), jnp.stack([x_lo - shift_c, y_lo], -1)])
            rect_hi = jnp.concatenate([jnp.stack([x_hi, y_hi], -1), jnp.stack([x_hi - shift_c, y_hi], -1)])
            ok2 = jnp.concatenate([ok, ok & wrap_copy])
            depth = jnp.concatenate([r, r])
            op2 = jnp.concatenate([opac, opac])
        else:
            rect_lo, rect_hi = jnp.stack([x_lo, y_lo], -1), jnp.stack([x_hi, y_hi], -1)
            ok2, depth, op2 = ok, r, opac
        binning = bin_gaussians(rect_lo, rect_hi, ok2, op2, depth, tx, ty, options.pair_capacity, tile_size=_SQRT_TILE)
        gids = jnp.where(binning.pair_gids >= n, binning.pair_gids - n, binning.pair_gids)

    with jax.named_scope("rasterize"):
        inten = gaussian_intensity(gaussians).astype(dtype)
        colors = jnp.stack([inten, jnp.zeros_like(inten), jnp.zeros_like(inten)], -1)
        acc, trans_t, hit = composite_tiles(
            options.implementation,
            gids,
            binning.tile_start,
            binning.tile_counts,
            rays_t,
            valid_t,
            g.means,
            g.quats,
            g.scales,
            g.opacities,
            colors,
            g.frames,
            chunk=options.chunk,
            tile_batch=options.tile_batch,
        )

    with jax.named_scope("points"):

        def untile(x):
            x = x.reshape((ty, tx, _SQRT_TILE, _SQRT_TILE) + x.shape[2:])
            x = jnp.moveaxis(x, 2, 1)
            return x.reshape((rp, nc) + x.shape[4:])

        alpha = 1.0 - untile(trans_t)
        has = alpha > 1e-6
        safe = jnp.where(has, alpha, 1.0)
        dist = jnp.where(has, untile(hit) / safe, 0.0)
        inten_r = jnp.clip(jnp.where(has, untile(acc[..., 0]) / safe, 0.0), 0.0, 1.0)
        p_w = o_w + dist[..., None] * d_w
        points = sensor_pose.end.inverse().apply(p_w)
    return LidarPass(dist, alpha, inten_r, points, valid, binning.num_pairs, binning.max_tile_pairs)


# ----------------------------------------------------------------------------------------------
# Whole spins: `nurec_jax.renderer.LidarCaster` (the jit owner) casts them in passes of `raycast_pass`.


@dataclasses.dataclass(frozen=True)
class LidarSpin:
    """One spin, host arrays in beam (ring) order: (R, C) per ray, (R, C, 3) points."""

    distance: np.ndarray
    alpha: np.ndarray
    intensity: np.ndarray
    points: np.ndarray

    def returns(self, model: LidarModel, opacity_threshold: float = 0.8, distance_filter: float | None = None):
        """(points (N, 3), intensities (N,), ring ids (N,)) of rays that return: alpha above the
        threshold, distance within the model's range, and (optionally) not an edge: a ray whose range
        differs from both column neighbours by more than `distance_filter` relative is dropped."""
        keep = (
            (self.alpha > opacity_threshold)
            & (self.distance >= model.min_range_m)
            & (self.distance <= model.max_range_m)
        )
        if distance_filter is not None:
            d = self.distance
            left = np.roll(d, 1, axis=1)
            right = np.roll(d, -1, axis=1)
            rel = np.minimum(np.abs(d - left), np.abs(d - right)) / np.maximum(d, 1e-6)
            keep &= rel <= distance_filter
        rows = np.nonzero(keep)[0]
        return self.points[keep], self.intensity[keep], rows.astype(np.uint16)
