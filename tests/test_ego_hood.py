"""tools/make_ego_hood.py: the hood is seen where a bonnet below and ahead of the camera must be."""

import numpy as np
import pytest
import render_fixtures as fx

from nurec_jax import data
from tools import (
    make_ego_hood,
    refine_pose,  # noqa: F401  (pytest imports both tools into one process: their absl flags must not collide)
)


def test_hood_covers_the_bottom_of_a_forward_camera():
    cam = fx.make_camera("pinhole", width=40, height=32)
    # Camera -> rig: optical axis (z) along rig x, image down (y) along rig -z; 1.45 m up, 1.7 m ahead.
    t = np.eye(4)
    t[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)
    t[:3, 3] = [1.7, 0.0, 1.45]
    rgba = make_ego_hood.hood_rgba(cam, t, height=1.05, front=3.1, half_width=0.85)
    alpha = rgba[..., 3]
    assert rgba.shape == (32, 40, 4) and np.all((rgba >= 0) & (rgba <= 1))
    assert alpha[:16].max() == 0.0  # nothing above the horizon
    assert alpha[-1, 20] == 1.0  # the bonnet fills the bottom centre
    assert 0.05 < alpha.mean() < 0.5
    assert np.all(rgba[..., :3][alpha == 0] == 0)


def test_unknown_camera_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no camera 'nope'"):
        make_ego_hood.write_hood(str(tmp_path), data.sample_scene_path(), "nope", "rig")
