"""Projection: each Gaussian's tile-selection rectangle from the unscented transform of its 7 sigma
points through the exact camera, under the rolling-shutter fixed point, plus culling, the depth sort
key and view-dependent colours (docs/rendering.md#unscented-projection, #rolling-shutter). Nothing here but the colours is
differentiated: rectangles and keys choose which pairs are evaluated, eval3d decides their alpha.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from nurec_jax import constants as C
from nurec_jax import math as nmath
from nurec_jax import sh as sh_lib
from nurec_jax.cameras import Camera
from nurec_jax.frames import MergedGaussians
from nurec_jax.poses import Pose, PosePair
from nurec_jax.rays import PoseTable, level_of, pose_table, shutter_levels, shutter_tau


def extent_sigmas(opacities):
    """How many standard deviations out a Gaussian still reaches the alpha threshold: the opacity-aware
    extent k = min(3.33, sqrt(2 ln(opacity / threshold))) of its footprint (camera tiles, lidar tiles)."""
    opac = jnp.maximum(opacities, 1e-30)
    return jnp.minimum(C.MAX_EXTENT_SIGMA, jnp.sqrt(jnp.maximum(2.0 * jnp.log(opac / C.ALPHA_THRESHOLD), 0.0)))


def in_image(uv, width, height, margin):
    return in_image_uv(uv[..., 0], uv[..., 1], width, height, margin)


def in_image_uv(u, v, width, height, margin):
    mx, my = margin * width, margin * height
    return (u >= -mx) & (u <= width + mx) & (v >= -my) & (v <= height + my)


def frame_to_camera(cam_tab: PoseTable, frame_tab: PoseTable, level, frame_idx):
    """Per-Gaussian frame -> camera rotation [N, 3, 3] and translation [N, 3] at exposure `level` [N]."""
    rc = cam_tab.rot[level]
    rot = nmath.matmul33(rc, frame_tab.rot[level, frame_idx])
    trans = nmath.matvec(rc, frame_tab.trans[level, frame_idx]) + cam_tab.trans[level]
    return rot, trans


def _transform_xyz(rot, trans, xyz):
    """rot [N, 3, 3] @ p + trans [N, 3] for points given as components xyz = (x, y, z), each [S, N]."""
    x, y, z = xyz
    r = jax.lax.optimization_barrier(tuple(jnp.moveaxis(rot.reshape(-1, 9), -1, 0)) + tuple(trans.T))
    return tuple(r[3 * i] * x + r[3 * i + 1] * y + r[3 * i + 2] * z + r[9 + i] for i in range(3))


def project_points(camera: Camera, sensor: PosePair, frames: PosePair, frame_idx, xyz, shutter: int, iterations: int):
    """Projects the sigma points of each Gaussian (frame `frame_idx` [N]), given as components
    xyz = (x, y, z) each [S, N] with the centre at s = 0, under the rolling-shutter fixed point
    (docs/rendering.md#rolling-shutter). Component arrays with the Gaussians on the minor axis vectorise on CPU, where
    (..., 3) ones do not.

    Returns a list of (u, v, valid), each [S, N]: under a global shutter one estimate; under a rolling
    shutter the projection at the exposure time the Gaussian's centre is seen at (the fixed point
    tau = shutter(project(pose(tau), centre)), iterated on the centre alone), plus the projections at
    the start and at the end of the exposure, whose union bounds the motion. Exposure times are row (or
    column) quantised, so poses come from a per-row table, composed once per Gaussian.
    """
    levels = shutter_levels(camera.width, camera.height, shutter)
    dtype = xyz[0].dtype
    cam_tab = pose_table(sensor, levels, dtype, invert=True)  # world -> camera, [L]
    frame_tab = pose_table(frames, levels, dtype)  # frame -> world, [L, F]
    n = xyz[0].shape[-1]

    def at(level, pts):
        rot, trans = frame_to_camera(cam_tab, frame_tab, level, frame_idx)
        p_cam = jax.lax.optimization_barrier(_transform_xyz(rot, trans, pts))
        u, v, ok = camera.project_xyz(*p_cam)
        ok = ok & in_image_uv(u, v, camera.width, camera.height, C.UT_IMAGE_MARGIN)
        # Materialise each estimate once: without the barrier XLA:CPU fuses the projection into every
        # consumer (mean, variance, validity, the fixed point's start) and recomputes it there.
        return jax.lax.optimization_barrier((u, v, ok))

    def level_at(u, v):
        tau = shutter_tau(jnp.stack([u, v], -1), camera.width, camera.height, shutter)
        return level_of(tau, levels)

    zero = jnp.zeros((n,), jnp.int32)
    if levels == 1:
        return [at(zero, xyz)]
    est = [at(zero, xyz), at(zero + levels - 1, xyz)]
    centre = tuple(c[:1] for c in xyz)
    (u0, v0, ok0), (u1, v1, _) = est
    u, v = jnp.where(ok0[0], u0[0], u1[0]), jnp.where(ok0[0], v0[0], v1[0])
    for _ in range(iterations):
        u, v, _ = at(level_at(u, v), centre)
        u, v = u[0], v[0]
    return [at(level_at(u, v), xyz)] + est


def sigma_points(g: MergedGaussians):
    """The 7 unscented sigma points of every Gaussian in its own frame, as components (x, y, z) each
    [7, N]: the centre, then centre +- each scaled principal axis (docs/rendering.md#unscented-projection)."""
    lam = C.UT_ALPHA**2 * (3 + C.UT_KAPPA) - 3
    spread = math.sqrt(3 + lam)
    rot = nmath.quat_to_matrix(g.quats)  # column j is principal axis j
    out = []
    for i in range(3):
        comp = (rot[:, i, :] * g.scales * spread).T  # [3, N]: component i of each scaled axis
        out.append(g.means[:, i] + jnp.concatenate([jnp.zeros_like(comp[:1]), comp, -comp], axis=0))
    return tuple(out)


def unscented_footprint(
    camera: Camera, sensor: PosePair, frames: PosePair, g: MergedGaussians, shutter: int, iterations: int
):
    """Tile-selection rectangle of every Gaussian from its 7 sigma points (docs/rendering.md#unscented-projection).

    Returns (lo (N, 2), hi (N, 2), valid (N,)) in pixels. Under a rolling shutter the rectangle is
    the union of the fixed-point footprint and the start- and end-of-exposure footprints: the UT
    footprint is only an estimate, and a fast-moving sensor shears the true one. Only the diagonal of
    the projected covariance is needed: the rectangle is axis-aligned.
    """
    lam = C.UT_ALPHA**2 * (3 + C.UT_KAPPA) - 3
    w0m = lam / (3 + lam)
    w0c = w0m + (1 - C.UT_ALPHA**2 + C.UT_BETA)
    wi = 1.0 / (2 * (3 + lam))
    dtype = g.means.dtype
    wm = jnp.array([w0m] + [wi] * 6, dtype)[:, None]
    wc = jnp.array([w0c] + [wi] * 6, dtype)[:, None]
    k = extent_sigmas(g.opacities)
    big = jnp.asarray(jnp.inf, dtype)
    lo = hi = None
    valid = jnp.zeros(g.opacities.shape, bool)
    for u, v, ok in project_points(camera, sensor, frames, g.frames, sigma_points(g), shutter, iterations):
        this_ok = jnp.any(ok, axis=0)
        e_lo, e_hi = [], []
        for c in (u, v):
            mean = jnp.sum(wm * c, axis=0)
            var = jnp.sum(wc * jnp.square(c - mean), axis=0) + C.COVARIANCE_DILATION
            half = k * jnp.sqrt(jnp.maximum(var, 0.0))
            e_lo.append(jnp.where(this_ok, mean - half, big))
            e_hi.append(jnp.where(this_ok, mean + half, -big))
        e_lo, e_hi = jnp.stack(e_lo, -1), jnp.stack(e_hi, -1)
        lo = e_lo if lo is None else jnp.minimum(lo, e_lo)
        hi = e_hi if hi is None else jnp.maximum(hi, e_hi)
        valid = valid | this_ok
    return lo, hi, valid


def project_gaussians(
    camera: Camera, sensor_pose: PosePair, frames: PosePair, g: MergedGaussians, shutter: int, iterations: int
):
    """Rectangles, culling, sort depth and colours of every Gaussian.

    Returns (rect_lo [N, 2], rect_hi [N, 2], ok [N] (projected, in front, opaque enough), depth [N],
    colors [N, 3]). Colours are SH evaluated toward the mid-exposure camera centre, in each Gaussian's
    own frame (differentiable); the rest runs under stop_gradient.
    """
    dtype = g.means.dtype
    sg = jax.lax.stop_gradient
    with jax.named_scope("project"):
        rect_lo, rect_hi, ok = unscented_footprint(
            camera, sg(sensor_pose), sg(frames), jax.tree_util.tree_map(sg, g), shutter, iterations
        )
        mid = sensor_pose.at(jnp.asarray(0.5, dtype))
        frames_mid = frames.at(jnp.full(frames.start.trans.shape[:1], 0.5, dtype))  # one pose per frame
        fmid = Pose(frames_mid.quat[g.frames], frames_mid.trans[g.frames])
        p_cam = sg(mid.inverse().apply(fmid.apply(g.means)))
        depth = jnp.linalg.norm(p_cam, axis=-1) if camera.wide_angle else p_cam[:, 2]
        ok = ok & (depth >= C.NEAR_CLIP) & (g.opacities >= C.ALPHA_THRESHOLD)
    with jax.named_scope("shade"):
        centre_local = fmid.inverse().apply(jnp.broadcast_to(mid.trans, g.means.shape))
        view = nmath.safe_normalize(g.means - centre_local)
        colors = sh_lib.sh_to_rgb(g.sh, view, g.sh_degree, jnp)
    return rect_lo, rect_hi, ok, depth, colors
