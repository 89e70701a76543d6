"""The compositor's custom VJP against JAX autodiff of the full-capacity scan (float64), edge cases included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import DIFF, cotangent_grads, random_tiles

from nurec_jax.kernels import rasterize_ref as RR


def _cap(args):
    return int(np.asarray(args["tile_counts"]).max())


@pytest.mark.parametrize("case", ["regular", "saturated", "single_frame"])
def test_custom_vjp_matches_autodiff(case):
    with jax.enable_x64(True):
        kw = dict(regular={}, saturated=dict(opacity=(0.9, 0.99), n=60, cap=40), single_frame=dict(n_frames=1))[case]
        args = random_tiles(3, **kw)
        cap = _cap(args)
        ref_fn = jax.jit(lambda a: RR.rasterize_tiles_ref(**a, chunk=4, tile_batch=2))
        auto_fn = jax.jit(lambda a: RR.rasterize_tiles_autodiff(**a, chunk=4, capacity=cap))
        ref, auto = ref_fn(args), auto_fn(args)
        for a, b in zip(ref, auto):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12)
        _, trans, _ = map(np.asarray, ref)  # rgb, transmittance, hit
        assert np.all(trans[0] == 1.0)  # the empty tile
        if case == "saturated":
            assert (trans[1:] < 1e-3).mean() > 0.3  # many pixels reached the stop rule
        g_ref, g_auto = cotangent_grads(args, ref, ref_fn, auto_fn)
        for k in DIFF:
            scale = max(1.0, float(jnp.abs(g_auto[k]).max()))
            np.testing.assert_allclose(np.asarray(g_ref[k]), np.asarray(g_auto[k]), atol=1e-10 * scale, err_msg=k)


def test_chunk_size_does_not_change_the_result():
    args = random_tiles(4)
    a = RR.rasterize_tiles_ref(**args, chunk=4, tile_batch=1)
    b = RR.rasterize_tiles_ref(**args, chunk=32, tile_batch=3)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=5e-5, atol=1e-5)  # float32 products


def _long_lists(seed, counts, n=200, n_px=16, n_frames=2, opacity=(0.05, 0.6)):
    """Tiles with the given list lengths (0 = empty), every Gaussian on every ray's path."""
    args = random_tiles(
        seed, n_tiles=len(counts), n_px=n_px, n_frames=n_frames, n=n, cap=6, opacity=opacity, empty_tile=False
    )
    rng = np.random.default_rng(seed + 1)
    lists = [rng.choice(n, c, replace=c > n).astype(np.int32) for c in counts]
    counts = np.array(counts, np.int32)
    gids = np.full(int(counts.sum()) + 5, -1, np.int32)
    gids[: counts.sum()] = np.concatenate(lists)
    args.update(
        pair_gids=jnp.asarray(gids),
        tile_counts=jnp.asarray(counts),
        tile_start=jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)),
    )
    return args


@pytest.mark.parametrize("case", ["long", "saturating"])
def test_units_walk_matches_the_sequential_oracle(case):
    """Long lists cut into many units, units of several tiles in one step and a tile's units spread over
    several steps (chunk 4, 3 units per step), an empty tile, lists that end mid-unit and on a unit
    boundary, and (saturating) pixels that stop inside a unit: forward and gradients as the sequential
    full-capacity scan, float64."""
    counts = [150, 0, 97, 8, 61]
    opacity = (0.05, 0.6) if case == "long" else (0.5, 0.95)
    with jax.enable_x64(True):
        args = _long_lists(7, counts, opacity=opacity)
        ref_fn = jax.jit(lambda a: RR.rasterize_tiles_ref(**a, chunk=4, tile_batch=3))
        auto_fn = jax.jit(lambda a: RR.rasterize_tiles_autodiff(**a, chunk=4, capacity=max(counts)))
        ref, auto = ref_fn(args), auto_fn(args)
        for a, b in zip(ref, auto):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12)
        _, trans, _ = map(np.asarray, ref)  # rgb, transmittance, hit
        assert np.all(trans[1] == 1.0)  # the empty tile
        names = (
            "pair_gids",
            "tile_start",
            "tile_counts",
            "rays",
            "pixel_valid",
            "means",
            "quats",
            "scales",
            "opacities",
            "colors",
            "frames",
        )
        _, (_, _, stop) = RR._forward_units(*[args[k] for k in names], 4, 3, False)
        stop = np.asarray(stop)
        stopped = stop < 2**30
        if case == "saturating":
            assert stopped.mean() > 0.25 and np.any(stop[stopped] % 4 != 0)  # stops, inside units too
            assert np.all(trans[stopped] > 1e-4 * 0.05)  # stopped before the threshold was crossed
        else:
            assert trans[0].min() > 1e-4  # nothing saturates: every unit composites
        g_ref, g_auto = cotangent_grads(args, ref, ref_fn, auto_fn)
        for k in DIFF:
            scale = max(1.0, float(jnp.abs(g_auto[k]).max()))
            np.testing.assert_allclose(np.asarray(g_ref[k]), np.asarray(g_auto[k]), atol=1e-10 * scale, err_msg=k)
