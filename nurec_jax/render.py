"""The differentiable camera renderer (NuRec's 3DGUT): unscented-transform tiling + per-ray eval3d.

Pipeline for one frame (rendering.md section 9):
  1. Per pixel: its exposure time tau (rolling shutter), its camera pose at tau, its ray; the same
     ray expressed in every actor's frame at tau.
  2. Per Gaussian (no gradients): the 7 sigma points through the exact camera with the rolling-shutter
     fixed point -> 2D mean and covariance -> opacity-aware tile rectangle; culling; depth key.
  3. (tile, Gaussian) pairs in a fixed-capacity buffer, one packed uint32 key each (tile id in the
     high bits, quantised log depth in the low bits), one stable sort, per-tile ranges.
  4. Per tile: eval3d + front-to-back compositing (`nurec_jax.kernels.rasterize_ref`).
  5. Sky / background behind.

`render` is the composition of the stage functions `prepare_frame` (1, 2 and colours), `bin_frame` (3),
`composite_frame` (4) and `compose_frame` (5), which the Renderer can also compile and time one by one.

Gradients flow to the sensor poses (through the rays and the SH view direction) and to the Gaussian
parameters (through eval3d and the colours); tiling and sorting are not differentiated.
Library functions are pure and never jit themselves; `nurec_jax.renderer.Renderer` owns the jit
boundary and grows capacities on overflow.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from nurec_jax import constants as C
from nurec_jax import math as nmath
from nurec_jax import sh as sh_lib
from nurec_jax import sky as sky_lib
from nurec_jax.cameras import Camera
from nurec_jax.kernels import rasterize_pallas, rasterize_ref
from nurec_jax.metadata import ShutterType
from nurec_jax.poses import Pose, PosePair
from nurec_jax.types import Gaussians, SceneGaussians, Sky


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """Static render configuration (part of the jit cache key).

    Attributes:
      pair_capacity: size of the (tile, Gaussian) pair buffer (the only capacity: tiles are ranges of the
        sorted pair list, so a long tile list costs no extra memory and never forces a recompile).
      chunk: Gaussians composited per step.
      tile_batch: chunk-sized units of the pair list (of any tiles) composited side by side per step by the
        reference compositor (32: measured best of 8 / 32 / 64 on the sample at 640x360, 2-core CPU).
      rolling_shutter_iterations: fixed-point iterations when projecting under a rolling shutter.
      disable_rolling_shutter: render every pixel at the start pose (render-grpc's option).
      implementation: compositor: "reference" (plain jnp), "pallas" (the Triton kernel; interpret mode
        off GPU), or "auto" (pallas on GPU, reference elsewhere).
      tile_size: pixels per tile side (a power of two), 0 for the backend's choice (`tile_size_for`):
        16 for the Pallas kernel (one GPU program per 16x16 tile), 8 for the reference compositor, whose
        cost is pairs x pixels per tile: street-scale Gaussians cover a few pixels, so 8x8 tiles evaluate
        2.2x fewer (pixel, Gaussian) pairs than 16x16 on the sample (BUILD_NOTES, Renderer, "Tile size").
    """

    pair_capacity: int = 1 << 18
    chunk: int = 32
    tile_batch: int = 32
    rolling_shutter_iterations: int = C.ROLLING_SHUTTER_ITERATIONS
    disable_rolling_shutter: bool = False
    implementation: str = "auto"
    tile_size: int = 0


def resolved_implementation(impl: str) -> str:
    """"reference" or "pallas" for an implementation name (see RenderOptions) on this backend."""
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl not in ("reference", "pallas"):
        raise ValueError(f"implementation must be 'auto', 'reference' or 'pallas', got {impl!r}")
    return impl


def tile_size_for(options: RenderOptions) -> int:
    """Pixels per tile side for `options` (see RenderOptions.tile_size)."""
    if options.tile_size:
        t = options.tile_size
        if t < 2 or t & (t - 1):
            raise ValueError(f"tile_size must be a power of two >= 2, got {t}")
        return t
    return C.TILE_SIZE if resolved_implementation(options.implementation) == "pallas" else C.REFERENCE_TILE_SIZE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActorPoses:
    """Object -> world poses of every actor track at the start and end of the exposure.

    Attributes:
      poses: PosePair with (A,) leading axes, one per `SceneGaussians.track_ids` entry.
      visible: (A,) bool; an invisible actor (outside its track's time range, or removed) is not drawn.
    """

    poses: PosePair
    visible: jax.Array

    @staticmethod
    def hidden(n: int, dtype=jnp.float32) -> "ActorPoses":
        """`n` actors, none drawn (identity poses)."""
        ident = Pose(jnp.tile(jnp.array([1.0, 0.0, 0.0, 0.0], dtype), (n, 1)), jnp.zeros((n, 3), dtype))
        return ActorPoses(PosePair(ident, ident), jnp.zeros((n,), bool))


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


# ----------------------------------------------------------------------------------------------
# Rolling shutter


def shutter_tau(uv: jax.Array, width: int, height: int, shutter_type: int) -> jax.Array:
    """Relative exposure time in [0, 1] of continuous image points (protocol.md 7.4)."""
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


def _effective_shutter(camera: Camera, options: RenderOptions) -> int:
    if options.disable_rolling_shutter:
        return int(ShutterType.GLOBAL)
    return int(camera.shutter_type)


# ----------------------------------------------------------------------------------------------
# Frames: frame 0 is the world, frame 1 + a is actor a.


def _frame_pairs(actors: ActorPoses, dtype) -> PosePair:
    ident = Pose(jnp.array([[1.0, 0.0, 0.0, 0.0]], dtype), jnp.zeros((1, 3), dtype))
    start = Pose(jnp.concatenate([ident.quat, actors.poses.start.quat.astype(dtype)]),
                 jnp.concatenate([ident.trans, actors.poses.start.trans.astype(dtype)]))
    end = Pose(jnp.concatenate([ident.quat, actors.poses.end.quat.astype(dtype)]),
               jnp.concatenate([ident.trans, actors.poses.end.trans.astype(dtype)]))
    return PosePair(start, end)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Merged:
    means: jax.Array
    quats: jax.Array
    scales: jax.Array
    opacities: jax.Array
    sh: jax.Array
    frames: jax.Array
    sh_degree: int = dataclasses.field(metadata=dict(static=True), default=0)


def _merge(gaussians: SceneGaussians, actors: ActorPoses) -> _Merged:
    s, d = gaussians.static, gaussians.dynamic
    k = max(s.sh.shape[1], d.sh.shape[1])

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, k - x.shape[1]), (0, 0)))

    dyn_op = d.opacities
    if d.count:
        dyn_op = jnp.where(actors.visible[gaussians.dynamic_track], d.opacities, 0.0)
    frames = jnp.concatenate([jnp.zeros(s.count, jnp.int32), 1 + gaussians.dynamic_track.astype(jnp.int32)])
    return _Merged(
        means=jnp.concatenate([s.means, d.means]),
        quats=jnp.concatenate([s.quats, d.quats]),
        scales=jnp.concatenate([s.scales, d.scales]),
        opacities=jnp.concatenate([s.opacities, dyn_op]),
        sh=jnp.concatenate([pad(s.sh), pad(d.sh)]),
        frames=frames,
        sh_degree=max(s.sh_degree, d.sh_degree),
    )


# ----------------------------------------------------------------------------------------------
# Projection (unscented transform) and tiling; nothing here is differentiated.


def _in_image(uv, width, height, margin):
    mx, my = margin * width, margin * height
    return (uv[..., 0] >= -mx) & (uv[..., 0] <= width + mx) & (uv[..., 1] >= -my) & (uv[..., 1] <= height + my)


def _shutter_levels(width: int, height: int, shutter: int) -> int:
    """How many distinct exposure times a shutter has (rows or columns; 1 for a global shutter)."""
    st = ShutterType(shutter)
    if st in (ShutterType.ROLLING_TOP_TO_BOTTOM, ShutterType.ROLLING_BOTTOM_TO_TOP):
        return max(height, 1)
    if st in (ShutterType.ROLLING_LEFT_TO_RIGHT, ShutterType.ROLLING_RIGHT_TO_LEFT):
        return max(width, 1)
    return 1


def _level_of(tau, levels: int):
    return jnp.clip(jnp.round(tau * max(levels - 1, 1)), 0, levels - 1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _PoseTable:
    """Poses at every distinct exposure time (rolling-shutter rows/columns), as matrices."""

    rot: jax.Array  # [L, ..., 3, 3]
    trans: jax.Array  # [L, ..., 3]


def _table(pair: PosePair, levels: int, dtype, invert: bool = False) -> _PoseTable:
    tau = jnp.arange(levels, dtype=dtype) / max(levels - 1, 1)
    extra = pair.start.trans.ndim - 1
    pose = pair.at(tau.reshape((levels,) + (1,) * extra))
    if invert:
        pose = pose.inverse()
    return _PoseTable(pose.rotation(), pose.trans)


def _frame_to_camera(cam_tab: _PoseTable, frame_tab: _PoseTable, level, frame_idx):
    """Per-Gaussian frame -> camera rotation [N, 3, 3] and translation [N, 3] at exposure `level` [N]."""
    rc = cam_tab.rot[level]
    rot = nmath.matmul33(rc, frame_tab.rot[level, frame_idx])
    trans = nmath.matvec(rc, frame_tab.trans[level, frame_idx]) + cam_tab.trans[level]
    return rot, trans


def project_points(camera: Camera, sensor: PosePair, frames: PosePair, frame_idx, x_local, shutter: int,
                   iterations: int):
    """Projects the sigma points x_local [N, S, 3] of each Gaussian (frame `frame_idx` [N]) under the
    rolling-shutter fixed point (rendering.md 4).

    Returns a list of (uv [N, S, 2], valid [N, S]) estimates: under a global shutter one; under a rolling
    shutter the projection at the exposure time the Gaussian's centre (sigma point 0) is seen at (the
    fixed point tau = shutter(project(pose(tau), centre)), iterated on the centre alone), plus the
    projections at the start and at the end of the exposure, whose union bounds the motion. Exposure
    times are row (or column) quantised, so poses come from a per-row table, composed once per Gaussian.
    """
    levels = _shutter_levels(camera.width, camera.height, shutter)
    dtype = x_local.dtype
    cam_tab = _table(sensor, levels, dtype, invert=True)  # world -> camera, [L]
    frame_tab = _table(frames, levels, dtype)  # frame -> world, [L, F]
    n = x_local.shape[0]

    def at(level, pts):
        rot, trans = _frame_to_camera(cam_tab, frame_tab, level, frame_idx)
        p_cam = nmath.matvec(rot[:, None], pts) + trans[:, None, :]
        uv, ok = camera.project(p_cam)
        return uv, ok & _in_image(uv, camera.width, camera.height, C.UT_IMAGE_MARGIN)

    zero = jnp.zeros((n,), jnp.int32)
    if levels == 1:
        return [at(zero, x_local)]
    est = [at(zero, x_local), at(zero + levels - 1, x_local)]
    centre = x_local[:, :1]
    (uv0, ok0), (uv1, ok1) = ((uv[:, :1], ok[:, :1]) for uv, ok in est)
    uv = jnp.where(ok0[..., None], uv0, uv1)
    for _ in range(iterations):
        level = _level_of(shutter_tau(uv, camera.width, camera.height, shutter), levels)[:, 0]
        uv, _ = at(level, centre)
    level = _level_of(shutter_tau(uv, camera.width, camera.height, shutter), levels)[:, 0]
    return [at(level, x_local)] + est


def unscented_footprint(camera: Camera, sensor: PosePair, frames: PosePair, g: _Merged, shutter: int,
                        iterations: int):
    """Tile-selection rectangle of every Gaussian from its 7 sigma points (rendering.md 2.1-2.2).

    Returns (lo (N, 2), hi (N, 2), valid (N,)) in pixels. Under a rolling shutter the rectangle is
    the union of the fixed-point footprint and the start- and end-of-exposure footprints: the UT
    footprint is only an estimate, and a fast-moving sensor shears the true one.
    """
    lam = C.UT_ALPHA ** 2 * (3 + C.UT_KAPPA) - 3
    spread = math.sqrt(3 + lam)
    w0m = lam / (3 + lam)
    w0c = w0m + (1 - C.UT_ALPHA ** 2 + C.UT_BETA)
    wi = 1.0 / (2 * (3 + lam))
    axes = nmath.quat_to_matrix(g.quats) * g.scales[:, None, :] * spread  # columns scaled
    offs = jnp.concatenate([jnp.zeros_like(axes[:, :, :1]), axes, -axes], axis=-1)  # [N, 3, 7]
    pts = g.means[:, None, :] + jnp.swapaxes(offs, 1, 2)  # [N, 7, 3]
    opac = jnp.maximum(g.opacities, 1e-30)
    k = jnp.minimum(C.MAX_EXTENT_SIGMA, jnp.sqrt(jnp.maximum(2.0 * jnp.log(opac / C.ALPHA_THRESHOLD), 0.0)))
    wm = jnp.array([w0m] + [wi] * 6, pts.dtype)
    wc = jnp.array([w0c] + [wi] * 6, pts.dtype)
    big = jnp.asarray(jnp.inf, pts.dtype)
    lo = hi = None
    valid = jnp.zeros(g.opacities.shape, bool)
    for uv, ok in project_points(camera, sensor, frames, g.frames, pts, shutter, iterations):
        mean = jnp.sum(wm[None, :, None] * uv, axis=1)
        diff = uv - mean[:, None, :]
        cov = jnp.einsum("k,nki,nkj->nij", wc, diff, diff)
        var = jnp.stack([cov[:, 0, 0], cov[:, 1, 1]], -1) + C.COVARIANCE_DILATION
        half = k[:, None] * jnp.sqrt(jnp.maximum(var, 0.0))
        this_ok = jnp.any(ok, axis=1)
        e_lo = jnp.where(this_ok[:, None], mean - half, big)
        e_hi = jnp.where(this_ok[:, None], mean + half, -big)
        lo = e_lo if lo is None else jnp.minimum(lo, e_lo)
        hi = e_hi if hi is None else jnp.maximum(hi, e_hi)
        valid = valid | this_ok
    return lo, hi, valid


def _tile_bits(n_tiles: int) -> int:
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


def bin_gaussians(rect_lo, rect_hi, valid, opacities, depth, tiles_x: int, tiles_y: int, options: RenderOptions,
                  tile_size: int = C.TILE_SIZE) -> Binning:
    """Emits (tile, Gaussian) pairs for each Gaussian's pixel rectangle and sorts them by (tile, depth)."""
    n_tiles = tiles_x * tiles_y
    if rect_lo.shape[0] == 0:
        return Binning(jnp.full((options.pair_capacity,), -1, jnp.int32), jnp.zeros(n_tiles, jnp.int32),
                       jnp.zeros(n_tiles, jnp.int32), jnp.int32(0), jnp.int32(0))
    tbits = _tile_bits(n_tiles)
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
    cap = options.pair_capacity
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
    return Binning(gids, start, tcount, total.astype(jnp.int32),
                   jnp.max(tcount).astype(jnp.int32))


# ----------------------------------------------------------------------------------------------
# Sky


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


# ----------------------------------------------------------------------------------------------
# The frame


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


def compositor(implementation: str):
    """The per-tile compositor for an `implementation` name (see RenderOptions)."""
    impl = resolved_implementation(implementation)
    return rasterize_pallas.rasterize_tiles_pallas if impl == "pallas" else rasterize_ref.rasterize_tiles_ref


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FramePrep:
    """Everything one frame needs before binning: rays, the merged Gaussians, their colours and tile
    rectangles (the output of the "projection" stage)."""

    rays: jax.Array  # [T, P, F, 6] per-pixel ray in every frame
    direction: jax.Array  # [T, P, 3] world ray directions (for the sky)
    gaussians: _Merged
    colors: jax.Array  # [N, 3]
    rect_lo: jax.Array  # [N, 2] pixel rectangle of each Gaussian (no gradient)
    rect_hi: jax.Array
    ok: jax.Array  # [N] bool: projected, in front, opaque enough
    depth: jax.Array  # [N] sort key distance


def _checked_actors(gaussians: SceneGaussians, actors: ActorPoses | None) -> ActorPoses:
    n_tracks = len(gaussians.track_ids)
    if actors is None:
        return ActorPoses.hidden(n_tracks, gaussians.static.means.dtype)
    if actors.visible.shape[0] != n_tracks:
        raise ValueError(f"actors holds {actors.visible.shape[0]} poses but the scene has {n_tracks} actor tracks "
                         f"{gaussians.track_ids}")
    return actors


def prepare_frame(gaussians: SceneGaussians, camera: Camera, sensor_pose: PosePair, actors: ActorPoses | None,
                  options: RenderOptions = RenderOptions()) -> FramePrep:
    """Stage 1 ("projection"): rays, unscented-transform footprints, culling, depth keys, SH colours."""
    actors = _checked_actors(gaussians, actors)
    dtype = gaussians.static.means.dtype
    shutter = _effective_shutter(camera, options)
    width, height = camera.width, camera.height
    frames = _frame_pairs(actors, dtype)
    g = _merge(gaussians, actors)

    with jax.named_scope("rays"):
        uv_np, _, _, _ = pixel_grid(width, height, tile_size_for(options))
        uv = jnp.asarray(uv_np, dtype)
        levels = _shutter_levels(width, height, shutter)
        level = _level_of(shutter_tau(uv, width, height, shutter), levels)  # [T, P]
        cam_tab = _table(sensor_pose, levels, dtype)  # camera -> world per row/column (differentiable)
        d_cam = camera.unproject(uv)
        origin = cam_tab.trans[level]
        direction = nmath.safe_normalize(nmath.matvec(cam_tab.rot[level], d_cam))
        n_frames = frames.start.quat.shape[0]
        if n_frames == 1:
            rays = jnp.concatenate([origin, direction], -1)[:, :, None, :]
        else:
            inv_tab = _table(frames, levels, dtype, invert=True)  # world -> frame, [L, F]
            rf, tf = inv_tab.rot[level], inv_tab.trans[level]  # [T, P, F, ...]
            o_f = nmath.matvec(rf, origin[:, :, None]) + tf
            d_f = nmath.matvec(rf, direction[:, :, None])
            rays = jnp.concatenate([o_f, d_f], -1)  # [T, P, F, 6]

    with jax.named_scope("project"):
        sg = jax.lax.stop_gradient
        rect_lo, rect_hi, ok = unscented_footprint(
            camera, sg(sensor_pose), sg(frames), jax.tree_util.tree_map(sg, g), shutter,
            options.rolling_shutter_iterations)
        mid = sensor_pose.at(jnp.asarray(0.5, dtype))
        frames_mid = frames.at(jnp.full(frames.start.trans.shape[:1], 0.5, dtype))  # one pose per frame
        fmid = Pose(frames_mid.quat[g.frames], frames_mid.trans[g.frames])
        p_world = fmid.apply(g.means)
        p_cam = sg(mid.inverse().apply(p_world))
        if camera.wide_angle:
            depth = jnp.linalg.norm(p_cam, axis=-1)
        else:
            depth = p_cam[:, 2]
        ok = ok & (depth >= C.NEAR_CLIP) & (g.opacities >= C.ALPHA_THRESHOLD)

    with jax.named_scope("shade"):
        # SH toward the mid-exposure camera centre, in each Gaussian's own frame.
        centre_local = fmid.inverse().apply(jnp.broadcast_to(mid.trans, g.means.shape))
        view = nmath.safe_normalize(g.means - centre_local)
        colors = sh_lib.sh_to_rgb(g.sh, view, g.sh_degree, jnp)
    return FramePrep(rays, direction, g, colors, rect_lo, rect_hi, ok, depth)


def bin_frame(prep: FramePrep, camera: Camera, options: RenderOptions = RenderOptions()) -> Binning:
    """Stage 2 ("binning"): (tile, Gaussian) pairs, one sort, per-tile ranges."""
    tile = tile_size_for(options)
    _, _, tiles_x, tiles_y = pixel_grid(camera.width, camera.height, tile)
    sg = jax.lax.stop_gradient
    with jax.named_scope("bin"):
        return bin_gaussians(prep.rect_lo, prep.rect_hi, prep.ok, sg(prep.gaussians.opacities), prep.depth,
                             tiles_x, tiles_y, options, tile)


def composite_frame(prep: FramePrep, binning: Binning, camera: Camera, options: RenderOptions = RenderOptions()):
    """Stage 3 ("compositing"): per-tile eval3d + front-to-back compositing -> (rgb, T, hit) per tile pixel."""
    _, valid_np, _, _ = pixel_grid(camera.width, camera.height, tile_size_for(options))
    g = prep.gaussians
    dtype = g.means.dtype
    with jax.named_scope("rasterize"):
        if g.means.shape[0] == 0:  # nothing but sky
            n_t, n_p = valid_np.shape
            return jnp.zeros((n_t, n_p, 3), dtype), jnp.ones((n_t, n_p), dtype), jnp.zeros((n_t, n_p), dtype)
        return compositor(options.implementation)(
            binning.pair_gids, binning.tile_start, binning.tile_counts, prep.rays, jnp.asarray(valid_np), g.means,
            g.quats, g.scales, g.opacities, prep.colors, g.frames, chunk=options.chunk, tile_batch=options.tile_batch)


def compose_frame(sky: Sky, camera: Camera, prep: FramePrep, binning: Binning, rgb, trans, hit) -> RenderOutput:
    """Stage 4 ("compose"): sky behind, alpha and depth, tiles -> image."""
    width, height = camera.width, camera.height
    tile = math.isqrt(rgb.shape[1])  # [T, tile * tile, 3]
    with jax.named_scope("compose"):
        rgb = rgb + trans[..., None] * sky_color(sky, prep.direction)
        alpha = 1.0 - trans
        depth_px = jnp.where(alpha > 1e-6, hit / jnp.where(alpha > 1e-6, alpha, 1.0), 0.0)
    return RenderOutput(
        rgb=untile(rgb, width, height, tile),
        alpha=untile(alpha, width, height, tile),
        hit_distance=untile(hit, width, height, tile),
        depth=untile(depth_px, width, height, tile),
        num_pairs=binning.num_pairs,
        max_tile_pairs=binning.max_tile_pairs,
    )


def render(
    gaussians: SceneGaussians,
    camera: Camera,
    sensor_pose: PosePair,
    actors: ActorPoses | None = None,
    options: RenderOptions = RenderOptions(),
) -> RenderOutput:
    """Renders one camera frame: `prepare_frame`, `bin_frame`, `composite_frame`, `compose_frame`.

    Args:
      gaussians: the scene (static layers in world, actors cuboid-local).
      camera: camera model at the output resolution.
      sensor_pose: camera -> world poses at the start and end of the exposure.
      actors: object -> world poses of each track (`gaussians.track_ids` order); None hides all actors.
      options: static configuration.

    Returns:
      RenderOutput; check `num_pairs` against `options.pair_capacity` (the Renderer does).

    Raises:
      ValueError: `actors` does not hold one entry per `gaussians.track_ids`.
    """
    prep = prepare_frame(gaussians, camera, sensor_pose, actors, options)
    binning = bin_frame(prep, camera, options)
    rgb, trans, hit = composite_frame(prep, binning, camera, options)
    return compose_frame(gaussians.sky, camera, prep, binning, rgb, trans, hit)
