"""Plain-numpy float64 reference of NuRec's PPISP post-processing, for tests.

Written from the model description, not from nurec_jax.ppisp: Python branches on the indices,
per-channel loops and masked assignment per curve region (forward only, so no gradient guards).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5


def _softplus(x):
    return np.log1p(np.exp(-abs(x))) + max(x, 0.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def crf_knots(raw) -> dict:
    """Knots of one channel's curve from its 7 raw values (python floats)."""
    r = [float(v) for v in raw]
    x0off, y0, y1f = _softplus(r[0]), _sigmoid(r[1]), _sigmoid(r[2])
    toe, sh, ov = _softplus(r[3]), _softplus(r[4]), _softplus(r[5])
    gamma = max(_softplus(r[6]), 0.1)
    x0 = x0off * (1.0 + toe)
    s0 = y0 / x0off
    y0g = y0 ** (1.0 / gamma)
    m = s0 / (gamma * y0g ** (gamma - 1.0))
    y1 = y0 + (1.0 - y0) * y1f
    x1 = x0 + (y1 ** (1.0 / gamma) - y0g) / m
    s1 = gamma * m * (y1 ** (1.0 / gamma)) ** (gamma - 1.0)
    sh_y = 1.0 + (1.0 - y1) * ov
    sh_x = x1 + (sh_y - y1) / s1 * (1.0 + sh)
    return dict(x0=x0, y0=y0, s0=s0, y0g=y0g, m=m, gamma=gamma, x1=x1, y1=y1, s1=s1, sh_x=sh_x, sh_y=sh_y)


def _solve(x, y, s):
    b = s * x / y
    return np.log(max(y, EPS)) - b * np.log(max(x, EPS)), b


def crf_channel(x: np.ndarray, raw) -> np.ndarray:
    """One channel's response curve on x (any shape)."""
    k = crf_knots(raw)
    x = np.asarray(x, np.float64)
    out = np.ones_like(x)
    out[x < 0] = 0.0
    sel = (x >= 0) & (x < k["x0"])
    ln_a, b = _solve(k["x0"], k["y0"], k["s0"])
    out[sel] = np.exp(ln_a + b * np.log(np.maximum(x[sel], EPS)))
    sel = (x >= k["x0"]) & (x < k["x1"])
    out[sel] = (k["y0g"] + k["m"] * (x[sel] - k["x0"])) ** k["gamma"]
    sel = (x >= k["x1"]) & (x < k["sh_x"])
    ln_a, b = _solve(k["sh_x"] - k["x1"], k["sh_y"] - k["y1"], k["s1"])
    out[sel] = k["sh_y"] - np.exp(ln_a + b * np.log(np.maximum(k["sh_x"] - x[sel], EPS)))
    return np.clip(out, 0.0, 1.0)


def ppisp_numpy(exposure, vignetting, color, crf, rgb, camera_index: int, frame_index: int):
    """The post-processed image (H, W, 3) in float64; an index outside its table counts as -1."""
    exposure, vignetting, color, crf = (np.asarray(a, np.float64) for a in (exposure, vignetting, color, crf))
    img = np.array(rgb, np.float64)
    h, w = img.shape[:2]
    f = frame_index if 0 <= frame_index < exposure.shape[0] else -1
    c = camera_index if 0 <= camera_index < crf.shape[0] else -1

    if f >= 0:
        img = img * 2.0 ** exposure[f]

    if c >= 0:
        jj, ii = np.meshgrid(np.arange(w), np.arange(h))  # (H, W) column / row indices
        u, v = (jj + 0.5) / w, (ii + 0.5) / h
        for ch in range(3):
            cx, cy, a1, a2, a3 = vignetting[c, ch]
            r2 = (u - cx) ** 2 + (v - cy) ** 2
            img[..., ch] *= np.clip(1.0 + a1 * r2 + a2 * r2**2 + a3 * r2**3, 0.0, 1.0)

    if f >= 0:
        hom = np.append(color[f], 1.0).reshape(3, 3)
        intensity = img.sum(axis=-1)
        rgi = np.stack([img[..., 0], img[..., 1], intensity], axis=-1)
        y = rgi @ hom.T
        y = y * (intensity / (y[..., 2] + EPS))[..., None]
        img = np.stack([y[..., 0], y[..., 1], y[..., 2] - y[..., 0] - y[..., 1]], axis=-1)

    if c >= 0:
        img = np.stack([crf_channel(img[..., ch], crf[c, ch]) for ch in range(3)], axis=-1)
    else:
        img = np.clip(img, 0.0, 1.0) ** (1.0 / 2.2)
    return np.clip(img, 0.0, 1.0)
