"""Camera models as frozen pytree dataclasses: NVIDIA FTheta, OpenCV pinhole, OpenCV fisheye.

Every model has `project(p_cam) -> (uv, valid)`, its component form `project_xyz(x, y, z) -> (u, v,
valid)` (what the projection stage uses: arrays of one coordinate vectorise better on CPU than (..., 3)
ones), and `unproject(uv) -> unit ray`, vectorised over leading axes and differentiable. Camera frame: OpenCV (x right, y down, z forward). Image
coordinates are continuous with pixel (row i, column j) covering [j, j+1) x [i, i+1), so its centre
is (j + 0.5, i + 0.5). FTheta principal points are stored by NuRec in the pixel-centre convention
and get +0.5 when a camera is built; OpenCV principal points are used as given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from nurec_jax import math as nmath
from nurec_jax.metadata import (
    FThetaIntrinsics,
    OpenCVFisheyeIntrinsics,
    OpenCVPinholeIntrinsics,
    PolynomialType,
    ShutterType,
)
from nurec_jax.types import static_field

_NEWTON_ITERATIONS = 8  # at most; see _poly_inverse


def _polyval(c: jax.Array, x: jax.Array) -> jax.Array:
    """Horner evaluation of sum_k c[k] x^k (c: (K,))."""
    out = jnp.zeros_like(x) + c[-1]
    for k in range(c.shape[0] - 2, -1, -1):
        out = out * x + c[k]
    return out


def _polyder(c: jax.Array) -> jax.Array:
    return c[1:] * jnp.arange(1, c.shape[0], dtype=c.dtype)


def _poly_inverse(c: jax.Array, y: jax.Array, x0: jax.Array, iterations: int = _NEWTON_ITERATIONS) -> jax.Array:
    """Solves P(x) = y by Newton from x0. The iterations run without gradients and stop early once every
    step is below sqrt(eps) of its x (quadratic convergence then leaves an error of order eps), at most
    `iterations` of them; one final Newton step carries the gradients, which gives the implicit
    derivative dx/dy = 1/P'(x) at the solution. From a fitted inverse polynomial one iteration usually
    suffices, so the early stop saves most of the work in projection-heavy stages."""
    dc = _polyder(c)

    def step(x, cs, dcs, yy):
        d = _polyval(dcs, x)
        d = jnp.where(jnp.abs(d) > 1e-12, d, 1e-12)
        return x - (_polyval(cs, x) - yy) / d

    cs, dcs, ys = jax.lax.stop_gradient(c), jax.lax.stop_gradient(dc), jax.lax.stop_gradient(y)
    x = jax.lax.stop_gradient(x0) + jnp.zeros_like(ys)
    rtol = float(np.sqrt(np.finfo(x.dtype).eps))

    def cond(state):
        i, _, done = state
        return (i < iterations) & ~done

    def body(state):
        i, xx, _ = state
        nx = step(xx, cs, dcs, ys)
        return i + 1, nx, jnp.all(jnp.abs(nx - xx) <= rtol * jnp.maximum(jnp.abs(nx), 1e-6))

    _, x, _ = jax.lax.while_loop(cond, body, (0, x, False))
    return step(jax.lax.stop_gradient(x), c, dc, y)


def _radius_and_angle(x, y, z):
    """rho = |(x, y)| (safe at 0) and the angle from the optical axis."""
    sq = x * x + y * y
    rho = jnp.where(sq > 1e-20, jnp.sqrt(jnp.where(sq > 1e-20, sq, 1.0)), 0.0)
    return rho, jnp.arctan2(rho, z)


def _project_stacked(camera, p_cam):
    u, v, ok = camera.project_xyz(p_cam[..., 0], p_cam[..., 1], p_cam[..., 2])
    return jnp.stack([u, v], -1), ok


def _safe_rho(rho):
    return jnp.where(rho > 1e-12, rho, 1.0)


_AXIS_EPS = 1e-7


def _theta_over_rho(rho, z, theta):
    """theta / rho with its on-axis limit 1 / z (so d(uv)/d(xy) is right on the optical axis)."""
    near = rho < _AXIS_EPS * jnp.abs(z)
    return jnp.where(near, 1.0 / jnp.where(jnp.abs(z) > 0, z, 1.0), theta / _safe_rho(rho))


def _ratio_at_zero(num, den, limit):
    """num / den, replaced by `limit` (the derivative at 0) where den ~ 0."""
    near = den < _AXIS_EPS
    return jnp.where(near, limit, num / jnp.where(near, 1.0, den))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FThetaCamera:
    """NVIDIA FTheta camera.

    Attributes:
      principal_point: (2,) continuous image coordinates (NuRec's value + 0.5).
      bw_poly: (6,) pixel distance -> angle (radians).
      fw_poly: (6,) angle -> pixel distance.
      linear_cde: (3,) [c, d, e] of A = [[c, d], [e, 1]].
      max_angle: () radians from the optical axis.
      width, height: image size in pixels (static).
      shutter_type: `ShutterType` int (static).
      reference: "backward" (bw_poly exact) or "forward" (static).
    """

    principal_point: jax.Array
    bw_poly: jax.Array
    fw_poly: jax.Array
    linear_cde: jax.Array
    max_angle: jax.Array
    width: int = static_field()
    height: int = static_field()
    shutter_type: int = static_field(default=int(ShutterType.GLOBAL))
    reference: str = static_field(default="backward")
    wide_angle: bool = static_field(default=False)

    model = "ftheta"

    def _a(self):
        c, d, e = self.linear_cde[0], self.linear_cde[1], self.linear_cde[2]
        return c, d, e

    def distance_of_angle(self, theta):
        if self.reference == "forward":
            return _polyval(self.fw_poly, theta)
        return _poly_inverse(self.bw_poly, theta, _polyval(self.fw_poly, theta))

    def angle_of_distance(self, r):
        if self.reference == "backward":
            return _polyval(self.bw_poly, r)
        return _poly_inverse(self.fw_poly, r, _polyval(self.bw_poly, r))

    def project(self, p_cam):
        return _project_stacked(self, p_cam)

    def project_xyz(self, x, y, z):
        rho, theta_full = _radius_and_angle(x, y, z)
        theta = jnp.minimum(theta_full, self.max_angle)
        delta = self.distance_of_angle(theta)
        d0 = self.fw_poly[1] if self.reference == "forward" else 1.0 / self.bw_poly[1]
        scale = _ratio_at_zero(delta, theta, d0) * _theta_over_rho(rho, z, theta)
        x, y = scale * x, scale * y
        c, d, e = self._a()
        pp = self.principal_point
        return c * x + d * y + pp[0], e * x + y + pp[1], theta_full < self.max_angle

    def unproject(self, uv):
        c, d, e = self._a()
        off = uv - self.principal_point
        det = c - d * e
        px = (off[..., 0] - d * off[..., 1]) / det
        py = (-e * off[..., 0] + c * off[..., 1]) / det
        r = nmath.safe_norm(jnp.stack([px, py], -1))
        theta = self.angle_of_distance(r)
        t0 = self.bw_poly[1] if self.reference == "backward" else 1.0 / self.fw_poly[1]
        s = _ratio_at_zero(jnp.sin(theta), theta, 1.0) * _ratio_at_zero(theta, r, t0)
        return jnp.stack([s * px, s * py, jnp.cos(theta)], -1)

    def scaled(self, s: float, width: int, height: int) -> "FThetaCamera":
        """The same lens on an image scaled by `s` (continuous coordinates scale by s)."""
        k = np.arange(6)
        return dataclasses.replace(
            self,
            principal_point=self.principal_point * s,
            bw_poly=self.bw_poly / jnp.asarray(s**k, self.bw_poly.dtype),
            fw_poly=self.fw_poly * s,
            width=width,
            height=height,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OpenCVPinholeCamera:
    """OpenCV pinhole, rational radial k1..k6, tangential p1 p2, thin prism s1..s4."""

    principal_point: jax.Array  # (2,)
    focal_length: jax.Array  # (2,)
    radial: jax.Array  # (6,)
    tangential: jax.Array  # (2,)
    thin_prism: jax.Array  # (4,)
    width: int = static_field()
    height: int = static_field()
    shutter_type: int = static_field(default=int(ShutterType.GLOBAL))

    model = "opencv-pinhole"
    wide_angle = False

    def _distort(self, xn, yn):
        k, p, s = self.radial, self.tangential, self.thin_prism
        r2 = xn * xn + yn * yn
        r4 = r2 * r2
        r6 = r4 * r2
        dr = (1 + k[0] * r2 + k[1] * r4 + k[2] * r6) / (1 + k[3] * r2 + k[4] * r4 + k[5] * r6)
        dx = 2 * p[0] * xn * yn + p[1] * (r2 + 2 * xn * xn) + s[0] * r2 + s[1] * r4
        dy = p[0] * (r2 + 2 * yn * yn) + 2 * p[1] * xn * yn + s[2] * r2 + s[3] * r4
        return dr, dx, dy

    def project(self, p_cam):
        return _project_stacked(self, p_cam)

    def project_xyz(self, x, y, z):
        zs = jnp.where(z > 1e-6, z, 1e-6)
        xn, yn = x / zs, y / zs
        dr, dx, dy = self._distort(xn, yn)
        f, pp = self.focal_length, self.principal_point
        u = (xn * dr + dx) * f[0] + pp[0]
        v = (yn * dr + dy) * f[1] + pp[1]
        return u, v, (z > 1e-6) & (dr > 0.8) & (dr < 1.2)

    def unproject(self, uv):
        n = (uv - self.principal_point) / self.focal_length
        x0, y0 = n[..., 0], n[..., 1]
        x, y = x0, y0
        for _ in range(20):  # ncore-style fixed point; converges for the distortions cameras have
            dr, dx, dy = self._distort(x, y)
            x, y = (x0 - dx) / dr, (y0 - dy) / dr
        return nmath.safe_normalize(jnp.stack([x, y, jnp.ones_like(x)], -1))

    def scaled(self, s: float, width: int, height: int) -> "OpenCVPinholeCamera":
        return dataclasses.replace(
            self,
            principal_point=self.principal_point * s,
            focal_length=self.focal_length * s,
            width=width,
            height=height,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OpenCVFisheyeCamera:
    """OpenCV fisheye: delta(theta) = theta (1 + k1 theta^2 + k2 theta^4 + k3 theta^6 + k4 theta^8)."""

    principal_point: jax.Array  # (2,)
    focal_length: jax.Array  # (2,)
    radial: jax.Array  # (4,)
    max_angle: jax.Array  # ()
    width: int = static_field()
    height: int = static_field()
    shutter_type: int = static_field(default=int(ShutterType.GLOBAL))
    wide_angle: bool = static_field(default=False)

    model = "opencv-fisheye"

    def _coeffs(self):
        k = self.radial
        z = jnp.zeros((), k.dtype)
        return jnp.stack([z, jnp.ones((), k.dtype), z, k[0], z, k[1], z, k[2], z, k[3]])

    def project(self, p_cam):
        return _project_stacked(self, p_cam)

    def project_xyz(self, x, y, z):
        rho, theta_full = _radius_and_angle(x, y, z)
        theta = jnp.minimum(theta_full, self.max_angle)
        delta = _polyval(self._coeffs(), theta)
        s = _ratio_at_zero(delta, theta, 1.0) * _theta_over_rho(rho, z, theta)
        f, pp = self.focal_length, self.principal_point
        return s * x * f[0] + pp[0], s * y * f[1] + pp[1], theta_full < self.max_angle

    def unproject(self, uv):
        n = (uv - self.principal_point) / self.focal_length
        delta = nmath.safe_norm(n)
        theta = _poly_inverse(self._coeffs(), delta, jnp.minimum(delta, self.max_angle), 8)
        s = _ratio_at_zero(jnp.sin(theta), theta, 1.0) * _ratio_at_zero(theta, delta, 1.0)
        return jnp.stack([s * n[..., 0], s * n[..., 1], jnp.cos(theta)], -1)

    def scaled(self, s: float, width: int, height: int) -> "OpenCVFisheyeCamera":
        return dataclasses.replace(
            self,
            principal_point=self.principal_point * s,
            focal_length=self.focal_length * s,
            width=width,
            height=height,
        )


Camera = Union[FThetaCamera, OpenCVPinholeCamera, OpenCVFisheyeCamera]


def fit_inverse_poly(coeffs: np.ndarray, x_max: float, degree: int = 5, samples: int = 512) -> np.ndarray:
    """Least-squares polynomial (c0 = 0) for the inverse of a monotone polynomial on [0, x_max]."""
    x = np.linspace(0.0, x_max, samples)
    y = np.polynomial.polynomial.polyval(x, coeffs)
    a = np.stack([y**k for k in range(1, degree + 1)], 1)
    sol = np.linalg.lstsq(a, x, rcond=None)[0]
    return np.concatenate([[0.0], sol])


def camera_from_intrinsics(intr, dtype=jnp.float32) -> Camera:
    """Builds a camera model at the calibrated (native) resolution from scene/request intrinsics."""
    w, h = intr.resolution
    arr = lambda v: jnp.asarray(np.asarray(v, np.float64), dtype)  # noqa: E731
    shutter = int(intr.shutter_type)
    if isinstance(intr, FThetaIntrinsics):
        bw = np.asarray(intr.pixeldist_to_angle_poly, np.float64)
        fw = np.asarray(intr.angle_to_pixeldist_poly, np.float64)
        r_max = 1.2 * math.hypot(w, h)
        reference = "backward" if intr.reference_poly == PolynomialType.PIXELDIST_TO_ANGLE else "forward"
        if reference == "backward" and fw.size == 0:
            r_edge = r_max
            theta = np.polynomial.polynomial.polyval(np.linspace(0, r_max, 256), bw)
            if np.any(np.diff(theta) <= 0):  # fit only over the monotone part
                r_edge = np.linspace(0, r_max, 256)[np.argmax(np.diff(theta) <= 0)]
            fw = fit_inverse_poly(bw, r_edge)
        if reference == "forward" and bw.size == 0:
            bw = fit_inverse_poly(fw, min(intr.max_angle, math.pi))
        pp = np.asarray(intr.principal_point) + 0.5  # pixel-centre convention -> continuous
        return FThetaCamera(
            arr(pp),
            arr(bw),
            arr(fw),
            arr(intr.linear_cde),
            arr(intr.max_angle),
            w,
            h,
            shutter,
            reference,
            bool(intr.max_angle > math.pi / 2),
        )
    if isinstance(intr, OpenCVPinholeIntrinsics):
        return OpenCVPinholeCamera(
            arr(intr.principal_point),
            arr(intr.focal_length),
            arr(intr.radial_coeffs),
            arr(intr.tangential_coeffs),
            arr(intr.thin_prism_coeffs),
            w,
            h,
            shutter,
        )
    if isinstance(intr, OpenCVFisheyeIntrinsics):
        return OpenCVFisheyeCamera(
            arr(intr.principal_point),
            arr(intr.focal_length),
            arr(intr.radial_coeffs),
            arr(intr.max_angle),
            w,
            h,
            shutter,
            bool(intr.max_angle > math.pi / 2),
        )
    raise TypeError(f"unsupported intrinsics {type(intr).__name__}")


def output_resolution(native_w: int, native_h: int, req_w: int, req_h: int) -> tuple[int, int, float]:
    """NuRec's output size rule (docs/wire.md#resolution-rule): keep the native aspect ratio.

    Returns (out_w, out_h, scale). A zero request dimension is derived from the other; both zero
    means native.
    """
    if req_w <= 0 and req_h <= 0:
        return native_w, native_h, 1.0
    if req_h > 0 and (req_w <= 0 or req_w / native_w <= req_h / native_h):
        return int(req_h * native_w / native_h), req_h, req_h / native_h
    return req_w, int(req_w / (native_w / native_h)), req_w / native_w


def camera_at_resolution(camera: Camera, req_w: int, req_h: int) -> Camera:
    """Rescales a native-resolution camera to NuRec's output size for a requested (w, h)."""
    out_w, out_h, s = output_resolution(camera.width, camera.height, req_w, req_h)
    if (out_w, out_h) == (camera.width, camera.height):
        return camera
    return camera.scaled(s, out_w, out_h)
