"""PPISP: NuRec's image-space camera post-processing, as pure differentiable jnp.

NuRec keeps, under `post_processings.<i>.ppisp.`, four learned tensors that turn rendered linear
radiance (after sky compositing) into what a given camera recorded on a given frame:

  exposure_params   (F,)       one exposure offset per frame, in stops.
  vignetting_params (C, 3, 5)  per camera and channel: optical centre (cx, cy) in normalised
                               sensor coordinates, then radial falloff coefficients a1..a3.
  color_params      (F, 8)     per frame: a 3x3 colour homography, row-major, last entry fixed to 1.
  crf_params        (C, 3, 7)  per camera and channel: raw values of a toe / power-law / shoulder
                               camera response curve.

Per pixel, in order (f = frame index, c = camera index; -1 disables the per-frame or per-camera
stages, and so does an index outside the table):

  1. exposure (f valid): rgb * 2**ev.
  2. vignetting (c valid): each channel times clip(1 + a1 r2 + a2 r2**2 + a3 r2**3, 0, 1), with
     r2 the squared distance from the pixel's (u, v) to that channel's centre.
  3. colour (f valid): the homography acts on (R, G, R+G+B); the result is rescaled so its third
     entry keeps the pixel's intensity R+G+B, then mapped back to RGB (B = I - R - G).
  4. camera response (c valid) per channel (`crf_curve`), or, without a camera, the display curve
     clip(rgb, 0, 1) ** (1 / 2.2).
  The result is clipped to [0, 1].

(u, v) are pixel centres normalised to [0, 1]: u = (j + 0.5) / W along a row, v = (i + 0.5) / H.
These conventions (and the raw homography entries) follow the description of NuRec's renderer;
NVIDIA's standalone `ppisp` package differs (centred uv, colour from chromaticity offsets, a
4-value CRF), so its tensors are rejected by `Ppisp.from_state`'s shape checks.

Everything is differentiable in the image and the parameters with NaN-free gradients: each
branch that could take a log or a power of a bad value is evaluated on a safe substitute inside
`jnp.where` (see nurec_jax.math). Camera and frame indices may be traced, so one compiled
program serves every camera and frame. Nothing here is jitted; callers choose the jit boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nurec_jax.errors import SceneFormatError

EPS = 1e-5  # floor inside the CRF logs and offset of the colour renormalisation, as in NuRec.
MIN_GAMMA = 0.1  # lower bound of the CRF's power-law exponent.
DISPLAY_GAMMA = 2.2  # the curve used when no camera is selected.

# key -> expected shape; "F" (frames, may be 0) and "C" (cameras, >= 1) must agree across keys.
_SHAPES = {
    "exposure_params": ("F",),
    "vignetting_params": ("C", 3, 5),
    "color_params": ("F", 8),
    "crf_params": ("C", 3, 7),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ppisp:
    """PPISP parameters of one post-processing block (all fields are leaves).

    Attributes:
      exposure_params: (F,) exposure offset per frame, stops; F may be 0.
      vignetting_params: (C, 3, 5) per camera and channel: cx, cy, a1, a2, a3.
      color_params: (F, 8) per frame: the colour homography without its fixed H[2, 2] = 1.
      crf_params: (C, 3, 7) per camera and channel: raw CRF values (see `crf_knots`).
    """

    exposure_params: jax.Array
    vignetting_params: jax.Array
    color_params: jax.Array
    crf_params: jax.Array

    @property
    def num_frames(self) -> int:
        return int(self.exposure_params.shape[0])

    @property
    def num_cameras(self) -> int:
        return int(self.crf_params.shape[0])

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray], where: str, prefix: str = "", dtype=jnp.float32) -> "Ppisp":
        """Checks and converts the four tensors `arrays[prefix + name]` (host side, not under jit).

        Args:
          arrays: state-dict-like mapping of numpy arrays.
          where: what `arrays` came from (file / member), for error messages.
          prefix: key prefix, e.g. "post_processings.0.ppisp.".
          dtype: floating dtype of the device arrays.

        Raises:
          SceneFormatError: a tensor is missing, has the wrong shape, disagrees with the others on
            F or C, has no camera (C = 0), or holds non-finite values; the message names the key.
        """
        return cls(**{name: jnp.asarray(a, dtype) for name, a in checked_state(arrays, where, prefix).items()})


def checked_state(arrays: Mapping[str, np.ndarray], where: str, prefix: str = "") -> dict[str, np.ndarray]:
    """The four PPISP tensors `arrays[prefix + name]`, by name, after the checks `Ppisp.from_state`
    documents (numpy only: a host-side loader validates without touching a device)."""
    sizes: dict[str, tuple[int, str]] = {}  # "F" / "C" -> (size, key it was read from)
    out = {name: _checked(arrays, prefix + name, pattern, sizes, where) for name, pattern in _SHAPES.items()}
    if sizes["C"][0] < 1:
        key, shape = prefix + "crf_params", out["crf_params"].shape
        raise SceneFormatError(f"{where}: {key!r} has shape {shape}; need at least one camera")
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IspIndex:
    """Which camera's and frame's PPISP parameters a render uses (int32 scalars, traced, so one
    compiled program serves every camera and frame); -1 disables the per-camera / per-frame terms."""

    camera: jax.Array
    frame: jax.Array

    @classmethod
    def of(cls, camera: int = -1, frame: int = -1) -> "IspIndex":
        return cls(jnp.asarray(camera, jnp.int32), jnp.asarray(frame, jnp.int32))


def _checked(arrays, key: str, pattern: tuple, sizes: dict, where: str) -> np.ndarray:
    """arrays[key] if its shape fits `pattern`, binding new symbolic sizes in `sizes`."""
    if key not in arrays:
        raise SceneFormatError(f"{where}: missing PPISP tensor {key!r}")
    a = np.asarray(arrays[key])
    want = [p if isinstance(p, int) else sizes.get(p, (None,))[0] for p in pattern]
    if a.ndim != len(pattern) or any(w is not None and d != w for d, w in zip(a.shape, want)):
        dims = ", ".join(map(str, pattern)) + ("," if len(pattern) == 1 else "")
        bound = ", ".join(f"{s} = {n} from {k!r}" for s, (n, k) in sizes.items() if s in pattern)
        expect = f"({dims})" + (f" with {bound}" if bound else "")
        raise SceneFormatError(f"{where}: {key!r} has shape {a.shape}, expected {expect}")
    for d, p in zip(a.shape, pattern):
        if isinstance(p, str):
            sizes.setdefault(p, (d, key))
    if not (np.issubdtype(a.dtype, np.number) and np.all(np.isfinite(a))):
        raise SceneFormatError(f"{where}: {key!r} (shape {a.shape}) is not all finite numbers")
    return a


def pixel_uv(height: int, width: int, dtype=jnp.float32) -> jax.Array:
    """(H, W, 2) normalised pixel-centre coordinates (u, v) = ((j + 0.5) / W, (i + 0.5) / H)."""
    u = (jnp.arange(width, dtype=dtype) + 0.5) / width
    v = (jnp.arange(height, dtype=dtype) + 0.5) / height
    return jnp.stack(jnp.broadcast_arrays(u[None, :], v[:, None]), axis=-1)


def exposure(rgb: jax.Array, ev: jax.Array) -> jax.Array:
    """rgb (..., 3) scaled by 2**ev (ev a scalar, stops)."""
    return rgb * jnp.exp2(ev)


def vignetting(rgb: jax.Array, params: jax.Array, uv: jax.Array) -> jax.Array:
    """rgb (..., H, W, 3) times each channel's radial falloff of `params` (3, 5) at uv (H, W, 2)."""
    d = uv[..., None, :] - params[:, :2]  # (H, W, 3, 2)
    r2 = jnp.sum(d * d, axis=-1)
    a1, a2, a3 = params[:, 2], params[:, 3], params[:, 4]
    falloff = 1.0 + r2 * (a1 + r2 * (a2 + r2 * a3))
    return rgb * jnp.clip(falloff, 0.0, 1.0)


def color_correction(rgb: jax.Array, params: jax.Array) -> jax.Array:
    """Applies the colour homography `params` (8,) (row-major, H[2, 2] = 1) to rgb (..., 3).

    The homography maps (R, G, I), I = R + G + B; the result y is rescaled by I / (y_2 + EPS) so
    its third entry is (almost) I again, and (y_0, y_1, y_2 - y_0 - y_1) is returned.
    """
    h = params
    r, g = rgb[..., 0], rgb[..., 1]
    i = r + g + rgb[..., 2]
    y0 = h[0] * r + h[1] * g + h[2] * i
    y1 = h[3] * r + h[4] * g + h[5] * i
    y2 = h[6] * r + h[7] * g + i
    denom = y2 + EPS
    scale = i / jnp.where(denom == 0.0, EPS, denom)  # only an exact zero is guarded
    y0, y1, y2 = y0 * scale, y1 * scale, y2 * scale
    return jnp.stack([y0, y1, y2 - y0 - y1], axis=-1)


class CrfKnots(NamedTuple):
    """Decoded camera response curve; each field has the shape of `raw` without its last axis.

    The curve is a power-law toe on [0, x0) through (x0, y0) with slope s0, the segment
    (y0g + m (x - x0)) ** gamma on [x0, x1) (y0g = y0 ** (1 / gamma)), and a mirrored power-law
    shoulder on [x1, sh_x) that leaves (x1, y1) with slope s1 towards sh_y >= 1 at sh_x. The
    pieces join with matching slopes at x0 and x1. NuRec derives each power-law exponent as
    slope * dx / dy of its piece; that ratio is identically 1 + toe (b_toe) and 1 + shoulder
    (b_shoulder), which is what is stored here (it stays defined when the shoulder is empty).
    """

    x0: jax.Array
    y0: jax.Array
    s0: jax.Array
    y0g: jax.Array
    m: jax.Array
    gamma: jax.Array
    x1: jax.Array
    y1: jax.Array
    s1: jax.Array
    sh_x: jax.Array
    sh_y: jax.Array
    b_toe: jax.Array
    b_shoulder: jax.Array


def crf_knots(raw: jax.Array) -> CrfKnots:
    """Decodes raw CRF values (..., 7) with softplus / sigmoid into the curve's knots.

    Written in logs where NuRec writes powers (y ** (1 / gamma) = exp(ln y / gamma)), which is the
    same function but keeps float32 gradients finite when a sigmoid saturates or gamma is small.
    """
    sp = jax.nn.softplus
    x0_off, toe = sp(raw[..., 0]), sp(raw[..., 3])
    shoulder, overshoot = sp(raw[..., 4]), sp(raw[..., 5])
    ln_y0, one_minus_y0 = jax.nn.log_sigmoid(raw[..., 1]), jax.nn.sigmoid(-raw[..., 1])
    y0, y1_frac = jnp.exp(ln_y0), jax.nn.sigmoid(raw[..., 2])
    gamma = jnp.maximum(sp(raw[..., 6]), MIN_GAMMA)
    x0 = x0_off * (1.0 + toe)
    s0 = y0 / x0_off
    y0g = jnp.exp(ln_y0 / gamma)
    m = s0 / (gamma * jnp.exp(ln_y0 * (gamma - 1.0) / gamma))
    y1 = y0 + one_minus_y0 * y1_frac
    ln_y1 = jnp.log(y1)
    x1 = x0 + (jnp.exp(ln_y1 / gamma) - y0g) / m
    s1 = gamma * m * jnp.exp(ln_y1 * (gamma - 1.0) / gamma)
    one_minus_y1 = one_minus_y0 * (1.0 - y1_frac)
    sh_y = 1.0 + one_minus_y1 * overshoot
    sh_x = x1 + (sh_y - y1) / s1 * (1.0 + shoulder)
    return CrfKnots(x0, y0, s0, y0g, m, gamma, x1, y1, s1, sh_x, sh_y, 1.0 + toe, 1.0 + shoulder)


def _power_law(x, x_ref, y_ref, b):
    """y_ref * (x / x_ref) ** b, written as exp(ln_a + b ln x) with the logs floored at EPS."""
    ln_a = jnp.log(jnp.maximum(y_ref, EPS)) - b * jnp.log(jnp.maximum(x_ref, EPS))
    return jnp.exp(ln_a + b * jnp.log(jnp.maximum(x, EPS)))


def crf_curve(x: jax.Array, raw: jax.Array) -> jax.Array:
    """The camera response of `raw` (3, 7) applied per channel to x (..., 3); output in [0, 1].

    0 below 0, toe / power-law / shoulder on [0, x0) / [x0, x1) / [x1, sh_x), 1 from sh_x on.
    """
    k = crf_knots(raw)
    in_toe = (x >= 0.0) & (x < k.x0)
    in_mid = (x >= k.x0) & (x < k.x1)
    in_sh = (x >= k.x1) & (x < k.sh_x)
    # Each piece sees x only inside its own interval (elsewhere a harmless knot), so the untaken
    # pieces stay finite and cannot poison the gradient.
    toe = _power_law(jnp.where(in_toe, x, k.x0), k.x0, k.y0, k.b_toe)
    mid = (k.y0g + k.m * (jnp.where(in_mid, x, k.x0) - k.x0)) ** k.gamma
    sh_in = k.sh_x - jnp.where(in_sh, x, k.x1)
    sh = k.sh_y - _power_law(sh_in, k.sh_x - k.x1, k.sh_y - k.y1, k.b_shoulder)
    y = jnp.where(x < k.x1, jnp.where(x < k.x0, toe, mid), jnp.where(x < k.sh_x, sh, 1.0))
    return jnp.clip(jnp.where(x < 0.0, 0.0, y), 0.0, 1.0)


def display_gamma(rgb: jax.Array) -> jax.Array:
    """clip(rgb, 0, 1) ** (1 / DISPLAY_GAMMA), with gradient 0 (not inf) at 0."""
    x = jnp.clip(rgb, 0.0, 1.0)
    pos = x > 0.0
    return jnp.where(pos, jnp.where(pos, x, 1.0) ** (1.0 / DISPLAY_GAMMA), 0.0)


def _lookup(index, n: int):
    """(index is in [0, n), index clamped into the table) for a possibly traced scalar index."""
    index = jnp.asarray(index, jnp.int32)
    return (index >= 0) & (index < n), jnp.clip(index, 0, max(n - 1, 0))


def apply(ppisp: Ppisp, rgb: jax.Array, camera_index, frame_index) -> jax.Array:
    """Post-processes a linear image with the camera's and frame's PPISP parameters.

    Args:
      ppisp: the parameters.
      rgb: (..., H, W, 3) linear radiance (after sky compositing); its dtype is the output's.
      camera_index: int32 scalar, may be traced; -1 or out of range: no vignetting, display
        gamma instead of the camera response.
      frame_index: int32 scalar, may be traced; -1 or out of range: no exposure or colour.
        Under an outer jit, pass both indices as jnp.int32 arrays: a Python int is weakly typed
        and traces once more.

    Returns:
      (..., H, W, 3) image in [0, 1].
    """
    rgb = jnp.asarray(rgb)
    dtype = rgb.dtype
    cam_ok, ci = _lookup(camera_index, ppisp.num_cameras)
    frame_ok, fi = _lookup(frame_index, ppisp.num_frames)
    has_frames, has_cameras = ppisp.num_frames > 0, ppisp.num_cameras > 0  # static
    if has_frames:
        rgb = jnp.where(frame_ok, exposure(rgb, ppisp.exposure_params[fi].astype(dtype)), rgb)
    if has_cameras:
        uv = pixel_uv(rgb.shape[-3], rgb.shape[-2], dtype)
        rgb = jnp.where(cam_ok, vignetting(rgb, ppisp.vignetting_params[ci].astype(dtype), uv), rgb)
    if has_frames:
        rgb = jnp.where(frame_ok, color_correction(rgb, ppisp.color_params[fi].astype(dtype)), rgb)
    out = display_gamma(rgb)
    if has_cameras:
        out = jnp.where(cam_ok, crf_curve(rgb, ppisp.crf_params[ci].astype(dtype)), out)
    return jnp.clip(out, 0.0, 1.0)
