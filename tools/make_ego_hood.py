"""Generates an ego-hood mask for a scene camera: `<output-dir>/<rig-id>/<camera>.png` (RGBA, transparent
outside the hood), the layout `serve-grpc --egocar-hood-dir` reads (docs/wire.md#ego-masks).

The hood is modelled in 3D and seen through the camera's own model (FTheta, pinhole or fisheye, with its
mount from the scene's calibration): a gently crowned bonnet below and ahead of the camera, with a
rounded front edge. Each pixel's ray is intersected with it (2x2 supersampled for an anti-aliased edge)
and shaded as dark car paint with a sky reflection that fades towards the front.

    python tools/make_ego_hood.py --output-dir out/hoods [--scene nurec_jax/data/sample_scene.usdz]
        [--camera-id camera_front_wide_120fov] [--rig-id hyperion_8_1]

The default rig id is AlpaSim's default `ego_mask_rig_config_id`, so an AlpaSim client finds the mask
without configuration.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

import nurec_jax
from nurec_jax import cameras
from nurec_jax.cli import _flags

_SCENE = flags.DEFINE_string("scene", None, "Scene .usdz (default: the bundled sample scene).")
_CAMERA = flags.DEFINE_string("camera_id", "camera_front_wide_120fov", "Camera logical id.")
_RIG = flags.DEFINE_string("rig_id", "hyperion_8_1", "Rig config id (the directory name).")
_OUT = flags.DEFINE_string("output_dir", None, "Hood directory (what --egocar-hood-dir points at).")
_HEIGHT = flags.DEFINE_float("hood_height", 1.05, "Bonnet height above the rig origin at its centre line, m.")
_FRONT = flags.DEFINE_float("hood_front", 3.1, "Bonnet front edge, m ahead of the rig origin (centre line).")
_HALF_WIDTH = flags.DEFINE_float("hood_half_width", 0.85, "Half the bonnet's width, m.")

PAINT = np.array([0.16, 0.18, 0.22])
SKY = np.array([0.55, 0.65, 0.80])


def hood_rgba(
    camera, t_cam_rig: np.ndarray, height: float, front: float, half_width: float, supersample: int = 2
) -> np.ndarray:
    """(H, W, 4) float RGBA of the hood seen by `camera` mounted at `t_cam_rig` (camera -> rig)."""
    h, w = camera.height, camera.width
    s = supersample
    ys, xs = np.meshgrid((np.arange(h * s) + 0.5) / s, (np.arange(w * s) + 0.5) / s, indexing="ij")
    d_cam = np.asarray(camera.unproject(jnp.asarray(np.stack([xs, ys], -1), jnp.float32)), np.float64)
    d = d_cam @ t_cam_rig[:3, :3].T
    c = t_cam_rig[:3, 3]
    # The bonnet z(x, y) = height - 0.12 (y / half_width)^2 - 0.05 (x - x0): crowned and sloping forward;
    # intersect approximately by two fixed-point steps on the plane through its centre line.
    x0 = c[0]
    t = np.full(d.shape[:2], np.inf)
    z_at = lambda p: height - 0.12 * (p[..., 1] / half_width) ** 2 - 0.05 * (p[..., 0] - x0)  # noqa: E731
    down = d[..., 2] < -1e-6
    z = np.full(d.shape[:2], height)
    for _ in range(3):
        t = np.where(down, (z - c[2]) / np.where(down, d[..., 2], -1.0), np.inf)
        p = c + np.where(np.isfinite(t), t, 0.0)[..., None] * d
        z = z_at(p)
    p = c + np.where(np.isfinite(t), t, 0.0)[..., None] * d
    edge = front - 0.35 * (p[..., 1] / half_width) ** 2  # rounded front edge
    inside = down & np.isfinite(t) & (np.abs(p[..., 1]) < half_width) & (p[..., 0] < edge) & (p[..., 0] > x0 - 1.0)
    # Paint: sky reflection strongest near the windscreen, fading to the front; a soft crease highlight.
    u = np.clip((p[..., 0] - x0) / max(front - x0, 1e-3), 0.0, 1.0)[..., None]
    crease = np.exp(-(((np.abs(p[..., 1]) - 0.45 * half_width) / 0.05) ** 2))[..., None]
    rgb = PAINT + (SKY - PAINT) * (0.35 * (1 - u) ** 2) + 0.12 * crease
    rgba = np.concatenate([np.clip(rgb, 0, 1), inside[..., None].astype(np.float64)], -1)
    rgba[..., :3] *= rgba[..., 3:]  # premultiply for the box filter, then undo
    rgba = rgba.reshape(h, s, w, s, 4).mean((1, 3))
    a = rgba[..., 3:]
    rgba[..., :3] = np.where(a > 0, rgba[..., :3] / np.maximum(a, 1e-6), 0.0)
    return rgba


def write_hood(
    output_dir: str,
    scene_path: str,
    camera_id: str,
    rig_id: str,
    height: float = 1.05,
    front: float = 3.1,
    half_width: float = 0.85,
) -> str:
    meta = nurec_jax.read_scene_metadata(scene_path)
    if camera_id not in meta.cameras:
        raise ValueError(f"the scene has no camera {camera_id!r} ({sorted(meta.cameras)})")
    cal = meta.cameras[camera_id]
    camera = cameras.camera_from_intrinsics(cal.intrinsics)
    rgba = hood_rgba(camera, np.asarray(cal.T_sensor_rig, np.float64), height, front, half_width)
    path = os.path.join(output_dir, rig_id, f"{camera_id}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.round(rgba * 255).astype(np.uint8), "RGBA").save(path)
    return path


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _OUT.value:
        raise app.UsageError("--output-dir is required")
    path = write_hood(
        _OUT.value,
        _SCENE.value or nurec_jax.sample_scene_path(),
        _CAMERA.value,
        _RIG.value,
        _HEIGHT.value,
        _FRONT.value,
        _HALF_WIDTH.value,
    )
    cover = np.asarray(Image.open(path))[..., 3].astype(float).mean() / 255
    print(f"wrote {path} ({cover:.1%} of the image is hood)")


if __name__ == "__main__":
    app.run(_main, flags_parser=_flags.parser())
