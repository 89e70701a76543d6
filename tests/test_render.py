"""The tiled 3DGUT renderer against an independent brute-force renderer, plus analytic checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bruteforce
import render_fixtures as fx
from nurec_jax import render as R
from nurec_jax.metadata import ShutterType
from nurec_jax.poses import PosePair

_OPTS = R.RenderOptions(pair_capacity=1 << 13, tile_capacity=1 << 8, chunk=8, tile_batch=4)
_render = jax.jit(R.render, static_argnames=("options",))

# Tolerance: float32 rendering vs float64 brute force, and Gaussians whose unscented-transform
# footprint misses a tile the true 3-sigma footprint touches (the UT only estimates the footprint);
# such a Gaussian's missing contribution is confined to a few pixels.
_ATOL = 2e-3
_MAX_BAD_FRACTION = 0.01


def _compare(model, shutter, motion=0.6, seed=0):
    cam = fx.make_camera(model, shutter)
    host = fx.random_scene(seed, wide=cam.wide_angle)
    start, end = fx.camera_poses(motion)
    out = _render(fx.to_scene(host), cam, PosePair.from_matrices(start.astype(np.float32), end.astype(np.float32)),
                  fx.actor_poses(host), options=_OPTS)
    assert int(out.num_pairs) <= _OPTS.pair_capacity and int(out.max_tile_pairs) <= _OPTS.tile_capacity
    means, quats, scales, opac, shc, frames = fx.brute_inputs(host)
    rgb, alpha, hit = bruteforce.render(cam, start, end, means, quats, scales, opac, shc, host["degree"], frames,
                                        host["actor_T"], fx.BACKGROUND, wide=cam.wide_angle)
    assert alpha.max() > 0.5 and (alpha < 0.9).mean() > 0.05  # neither empty nor a wall
    for name, a, b in (("rgb", np.asarray(out.rgb), rgb), ("alpha", np.asarray(out.alpha), alpha)):
        bad = np.abs(a - b).reshape(a.shape[0], a.shape[1], -1).max(-1) > _ATOL
        assert bad.mean() <= _MAX_BAD_FRACTION, f"{model}/{shutter} {name}: {bad.mean():.3%} pixels differ"
    np.testing.assert_allclose(np.asarray(out.hit_distance), hit, atol=0.02, rtol=1e-3)


@pytest.mark.parametrize("model", ["ftheta", "pinhole", "fisheye"])
@pytest.mark.parametrize("shutter", [ShutterType.GLOBAL, ShutterType.ROLLING_TOP_TO_BOTTOM])
def test_tiled_matches_brute_force(model, shutter):
    _compare(model, shutter)


@pytest.mark.parametrize("shutter", [ShutterType.ROLLING_LEFT_TO_RIGHT, ShutterType.ROLLING_BOTTOM_TO_TOP,
                                     ShutterType.ROLLING_RIGHT_TO_LEFT])
def test_tiled_matches_brute_force_rolling_directions(shutter):
    _compare("ftheta", shutter, seed=1)
