"""Package data: the bundled sample scene."""

from __future__ import annotations

import importlib.resources
import os

SAMPLE_SCENE_NAME = "sample_scene.usdz"


def sample_scene_path() -> str:
    """Filesystem path of the bundled sample NuRec scene (`tools/make_sample_scene.py` makes it)."""
    path = importlib.resources.files(__name__) / SAMPLE_SCENE_NAME
    return os.fspath(path)
