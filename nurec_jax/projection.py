"""Projection: each Gaussian's tile-selection rectangle from the unscented transform of its 7 sigma
points through the exact camera, under the rolling-shutter fixed point, plus culling, the depth sort
key and view-dependent colours (rendering.md 2.1-2.2, 4). Nothing here but the colours is
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
    mx, my = margin * width, margin * height
    return (uv[..., 0] >= -mx) & (uv[..., 0] <= width + mx) & (uv[..., 1] >= -my) & (uv[..., 1] <= height + my)


def frame_to_camera(cam_tab: PoseTable, frame_tab: PoseTable, level, frame_idx):
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
    levels = shutter_levels(camera.width, camera.height, shutter)
    dtype = x_local.dtype
    cam_tab = pose_table(sensor, levels, dtype, invert=True)  # world -> camera, [L]
    frame_tab = pose_table(frames, levels, dtype)  # frame -> world, [L, F]
    n = x_local.shape[0]

    def at(level, pts):
        rot, trans = frame_to_camera(cam_tab, frame_tab, level, frame_idx)
        p_cam = nmath.matvec(rot[:, None], pts) + trans[:, None, :]
        uv, ok = camera.project(p_cam)
        return uv, ok & in_image(uv, camera.width, camera.height, C.UT_IMAGE_MARGIN)

    zero = jnp.zeros((n,), jnp.int32)
    if levels == 1:
        return [at(zero, x_local)]
    est = [at(zero, x_local), at(zero + levels - 1, x_local)]
    centre = x_local[:, :1]
    (uv0, ok0), (uv1, ok1) = ((uv[:, :1], ok[:, :1]) for uv, ok in est)
    uv = jnp.where(ok0[..., None], uv0, uv1)
    for _ in range(iterations):
        level = level_of(shutter_tau(uv, camera.width, camera.height, shutter), levels)[:, 0]
        uv, _ = at(level, centre)
    level = level_of(shutter_tau(uv, camera.width, camera.height, shutter), levels)[:, 0]
    return [at(level, x_local)] + est


def unscented_footprint(camera: Camera, sensor: PosePair, frames: PosePair, g: MergedGaussians, shutter: int,
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
    k = extent_sigmas(g.opacities)
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


def project_gaussians(camera: Camera, sensor_pose: PosePair, frames: PosePair, g: MergedGaussians, shutter: int,
                      iterations: int):
    """Rectangles, culling, sort depth and colours of every Gaussian.

    Returns (rect_lo [N, 2], rect_hi [N, 2], ok [N] (projected, in front, opaque enough), depth [N],
    colors [N, 3]). Colours are SH evaluated toward the mid-exposure camera centre, in each Gaussian's
    own frame (differentiable); the rest runs under stop_gradient.
    """
    dtype = g.means.dtype
    sg = jax.lax.stop_gradient
    with jax.named_scope("project"):
        rect_lo, rect_hi, ok = unscented_footprint(camera, sg(sensor_pose), sg(frames),
                                                   jax.tree_util.tree_map(sg, g), shutter, iterations)
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
