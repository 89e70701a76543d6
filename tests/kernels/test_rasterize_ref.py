"""The compositor's custom VJP against JAX autodiff of the full-capacity scan (float64), edge cases included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nurec_jax.kernels import rasterize_ref as RR


def _inputs(seed, n_tiles=3, n_px=16, n_frames=2, n=40, cap=24, opacity=(0.3, 0.99), empty_tile=True):
    """Random tiles in the binning's layout: one sorted pair list (-1 padded) and per-tile ranges. Tiles share
    Gaussians (a Gaussian straddling tiles), tile 0 is empty when `empty_tile`."""
    rng = np.random.default_rng(seed)
    lists = []
    for t in range(n_tiles):
        c = 0 if (empty_tile and t == 0) else int(rng.integers(5, cap + 1))
        lists.append(rng.choice(n, c, replace=False).astype(np.int32))
    counts = np.array([len(x) for x in lists], np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    gids = np.full(int(counts.sum()) + 7, -1, np.int32)
    gids[: counts.sum()] = np.concatenate(lists)
    o = rng.normal(0, 0.2, (n_tiles, n_px, n_frames, 3))
    d = rng.normal(0, 0.3, (n_tiles, n_px, n_frames, 3))
    d[..., 2] += 1
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    means = np.c_[rng.normal(0, 0.5, (n, 2)), rng.uniform(2, 6, n)]
    means[0] = [0.0, 0.0, -3.0]  # behind every ray origin: t* < 0, never composited
    return dict(
        pair_gids=jnp.asarray(gids),
        tile_start=jnp.asarray(starts),
        tile_counts=jnp.asarray(counts),
        rays=jnp.asarray(np.concatenate([o, d], -1)),
        pixel_valid=jnp.asarray(rng.uniform(size=(n_tiles, n_px)) > 0.1),
        means=jnp.asarray(means),
        quats=jnp.asarray(rng.normal(size=(n, 4))),
        scales=jnp.asarray(rng.uniform(0.2, 0.9, (n, 3))),
        opacities=jnp.asarray(rng.uniform(*opacity, n)),
        colors=jnp.asarray(rng.uniform(0, 1, (n, 3))),
        frames=jnp.asarray(rng.integers(0, n_frames, n).astype(np.int32)),
    )


def _cap(args):
    return int(np.asarray(args["tile_counts"]).max())


_DIFF = ("rays", "means", "quats", "scales", "opacities", "colors")


def cotangent_grads(args, outputs, *fns):
    """Gradients w.r.t. the differentiable inputs of sum(out * cot) for each fn, with random cotangents
    (shaped and typed like `outputs`) shared by all of them."""
    rng = np.random.default_rng(9)
    cot = [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in outputs]

    def loss(fn, diff):
        return sum(jnp.sum(o * c) for o, c in zip(fn({**args, **diff}), cot))

    diff = {k: args[k] for k in _DIFF}
    return [jax.jit(jax.grad(lambda d, fn=fn: loss(fn, d)))(diff) for fn in fns]


@pytest.mark.parametrize("case", ["regular", "saturated", "single_frame"])
def test_custom_vjp_matches_autodiff(case):
    with jax.enable_x64(True):
        kw = dict(regular={}, saturated=dict(opacity=(0.9, 0.99), n=60, cap=40), single_frame=dict(n_frames=1))[case]
        args = _inputs(3, **kw)
        cap = _cap(args)
        ref_fn = jax.jit(lambda a: RR.rasterize_tiles_ref(**a, chunk=4, tile_batch=2))
        auto_fn = jax.jit(lambda a: RR.rasterize_tiles_autodiff(**a, chunk=4, capacity=cap))
        ref, auto = ref_fn(args), auto_fn(args)
        for a, b in zip(ref, auto):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12)
        trans = np.asarray(ref[1])
        assert np.all(trans[0] == 1.0)  # the empty tile
        if case == "saturated":
            assert (trans[1:] < 1e-3).mean() > 0.3  # many pixels reached the stop rule
        g_ref, g_auto = cotangent_grads(args, ref, ref_fn, auto_fn)
        for k in _DIFF:
            scale = max(1.0, float(jnp.abs(g_auto[k]).max()))
            np.testing.assert_allclose(np.asarray(g_ref[k]), np.asarray(g_auto[k]), atol=1e-10 * scale, err_msg=k)


def test_chunk_size_does_not_change_the_result():
    args = _inputs(4)
    a = RR.rasterize_tiles_ref(**args, chunk=4, tile_batch=1)
    b = RR.rasterize_tiles_ref(**args, chunk=32, tile_batch=3)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=5e-5, atol=1e-5)  # float32 products


def _long_lists(seed, counts, n=200, n_px=16, n_frames=2, opacity=(0.05, 0.6)):
    """Tiles with the given list lengths (0 = empty), every Gaussian on every ray's path."""
    args = _inputs(
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
        trans = np.asarray(ref[1])
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
        for k in _DIFF:
            scale = max(1.0, float(jnp.abs(g_auto[k]).max()))
            np.testing.assert_allclose(np.asarray(g_ref[k]), np.asarray(g_auto[k]), atol=1e-10 * scale, err_msg=k)
