"""Ego-vehicle hood masks: `<egocar-hood-dir>/<rig_config_id>/<camera_logical_id>.png` (RGBA,
transparent outside the hood), composited over renders on request (docs/wire.md#ego-masks)."""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

from nurec_jax.server.request_errors import NotFound


class EgoMasks:
    def __init__(self, directory: str | None):
        self.directory = os.path.expanduser(directory) if directory else None
        if self.directory is not None and not os.path.isdir(self.directory):
            raise ValueError(f"--egocar-hood-dir {directory!r} is not a directory")

    def available(self) -> list[tuple[str, str]]:
        """(rig_config_id, camera_logical_id) of every mask, rig directories sorted."""
        if self.directory is None:
            return []
        out = []
        for rig in sorted(os.listdir(self.directory)):
            rig_dir = os.path.join(self.directory, rig)
            if not os.path.isdir(rig_dir):
                continue
            for name in sorted(os.listdir(rig_dir)):
                if name.lower().endswith(".png"):
                    out.append((rig, name[:-4]))
        return out

    def rig_exists(self, rig: str) -> bool:
        return (
            self.directory is not None
            and "/" not in rig
            and rig not in ("", ".", "..")
            and os.path.isdir(os.path.join(self.directory, rig))
        )

    @functools.lru_cache(maxsize=32)
    def _mask(self, rig: str, camera: str, width: int, height: int) -> np.ndarray | None:
        path = os.path.join(self.directory, rig, f"{camera}.png")
        if not os.path.isfile(path):
            return None
        with Image.open(path) as im:
            rgba = im.convert("RGBA").resize((width, height), Image.BILINEAR)
        return np.asarray(rgba, np.float32) / 255.0

    def composite(self, rgb: np.ndarray, rig: str, camera: str) -> np.ndarray:
        """out = img (1 - a) + hood a, the hood resized bilinearly to the image. An unknown rig is
        NOT_FOUND; a known rig without a mask for this camera leaves the image unchanged (NRE)."""
        if not self.rig_exists(rig):
            raise NotFound(
                f"ego_mask_id.rig_config_id: no ego masks for rig {rig!r} "
                f"(available: {sorted({r for r, _ in self.available()}) or 'none'})"
            )
        if "/" in camera or camera in ("", ".", ".."):
            return rgb
        h, w = rgb.shape[:2]
        mask = self._mask(rig, camera, w, h)
        if mask is None:
            return rgb
        a = mask[..., 3:4]
        return rgb * (1.0 - a) + mask[..., :3] * a
