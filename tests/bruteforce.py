"""An independent brute-force renderer (numpy, float64): every Gaussian evaluated at every pixel.

No tiles, no unscented transform, no culling shortcuts. Shares only the camera models' `unproject`
(tested on its own) and the SH basis with the renderer under test.
"""

from __future__ import annotations

import numpy as np

from nurec_jax import constants as C
from nurec_jax import geometry, sh


def tau_of(u, v, width, height, shutter):
    if shutter == 1:
        return np.floor(v) / max(height - 1, 1)
    if shutter == 2:
        return np.floor(u) / max(width - 1, 1)
    if shutter == 3:
        return (height - np.ceil(v)) / max(height - 1, 1)
    if shutter == 4:
        return (width - np.ceil(u)) / max(width - 1, 1)
    return np.zeros_like(u)


def interp(T0, T1, tau):
    """Camera/object -> world at tau: lerp translation, slerp rotation."""
    q0 = geometry.matrix_to_quat_wxyz(T0[:3, :3])
    q1 = geometry.matrix_to_quat_wxyz(T1[:3, :3])
    q = geometry.slerp_wxyz(np.broadcast_to(q0, tau.shape + (4,)), np.broadcast_to(q1, tau.shape + (4,)), tau)
    out = np.zeros(tau.shape + (4, 4))
    out[..., :3, :3] = geometry.quat_wxyz_to_matrix(q)
    out[..., :3, 3] = (1 - tau)[..., None] * T0[:3, 3] + tau[..., None] * T1[:3, 3]
    out[..., 3, 3] = 1
    return out


def render(
    camera,
    T_start,
    T_end,
    means,
    quats,
    scales,
    opac,
    shc,
    degree,
    frames,
    actor_T,
    background,
    shutter=None,
    wide=False,
):
    """Returns (rgb [H,W,3], alpha [H,W], hit [H,W]).

    frames: (N,) 0 = world, 1 + a = actor a; actor_T: list of (T_start, T_end) object -> world.
    """
    w, h = camera.width, camera.height
    shutter = int(camera.shutter_type) if shutter is None else shutter
    ys, xs = np.mgrid[0:h, 0:w]
    u, v = xs + 0.5, ys + 0.5
    tau = tau_of(u, v, w, h, shutter).astype(np.float64)
    dirs_cam = np.asarray(camera.unproject(np.stack([u, v], -1).astype(np.float32)), np.float64)
    dirs_cam /= np.linalg.norm(dirs_cam, axis=-1, keepdims=True)
    T = interp(T_start, T_end, tau)  # [H, W, 4, 4]
    o = T[..., :3, 3]
    d = np.einsum("hwij,hwj->hwi", T[..., :3, :3], dirs_cam)
    mid = interp(T_start, T_end, np.array(0.5))
    n = means.shape[0]
    # Per-Gaussian frame transforms at mid exposure (depth order, SH direction) and per pixel.
    rot = geometry.quat_wxyz_to_matrix(quats)
    depth = np.zeros(n)
    colors = np.zeros((n, 3))
    for i in range(n):
        f = frames[i]
        Tm = np.eye(4) if f == 0 else interp(actor_T[f - 1][0], actor_T[f - 1][1], np.array(0.5))
        pw = Tm[:3, :3] @ means[i] + Tm[:3, 3]
        pc = np.linalg.inv(mid) @ np.append(pw, 1.0)
        depth[i] = np.linalg.norm(pc[:3]) if wide else pc[2]
        centre_local = np.linalg.inv(Tm) @ np.append(mid[:3, 3], 1.0)
        vd = means[i] - centre_local[:3]
        vd /= np.linalg.norm(vd)
        colors[i] = sh.sh_to_rgb(shc[i], vd, degree)
    order = [i for i in np.argsort(depth, kind="stable") if depth[i] >= C.NEAR_CLIP]
    rgb = np.zeros((h, w, 3))
    hit = np.zeros((h, w))
    trans = np.ones((h, w))
    done = np.zeros((h, w), bool)
    for i in order:
        f = frames[i]
        if f == 0:
            oo, dd = o, d
        else:
            Ta = interp(actor_T[f - 1][0], actor_T[f - 1][1], tau)
            Ti = np.linalg.inv(Ta)
            oo = np.einsum("hwij,hwj->hwi", Ti[..., :3, :3], o) + Ti[..., :3, 3]
            dd = np.einsum("hwij,hwj->hwi", Ti[..., :3, :3], d)
        oc = ((oo - means[i]) @ rot[i]) / scales[i]
        dc = (dd @ rot[i]) / scales[i]
        dd2 = np.sum(dc * dc, -1)
        od = np.sum(oc * dc, -1)
        t_star = -od / dd2
        d2 = np.maximum(np.sum(oc * oc, -1) - od * od / dd2, 0)
        resp = np.exp(-0.5 * d2)
        alpha = np.minimum(C.MAX_ALPHA, opac[i] * resp)
        ok = (resp > C.MIN_KERNEL_RESPONSE) & (alpha > C.ALPHA_THRESHOLD) & (t_star > 0) & ~done
        alpha = np.where(ok, alpha, 0.0)
        t_next = trans * (1 - alpha)
        stop = ok & (t_next <= C.TRANSMITTANCE_THRESHOLD)
        add = ok & ~stop
        wgt = np.where(add, alpha * trans, 0.0)
        rgb += wgt[..., None] * colors[i]
        hit += wgt * t_star
        trans = np.where(add, t_next, trans)
        done |= stop
    rgb += trans[..., None] * np.asarray(background)
    return rgb, 1 - trans, hit
