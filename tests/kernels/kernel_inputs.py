"""Random inputs of the tile compositor (`nurec_jax.kernels.rasterize_*`) and gradients with random
cotangents, shared by the reference and the Pallas kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np

DIFF = ("rays", "means", "quats", "scales", "opacities", "colors")
"""The compositor's differentiable inputs (`random_tiles` keys)."""


def random_tiles(seed, n_tiles=3, n_px=16, n_frames=2, n=40, cap=24, opacity=(0.3, 0.99), empty_tile=True):
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


def cotangent_grads(args, outputs, *fns):
    """Gradients w.r.t. the differentiable inputs of sum(out * cot) for each fn, with random cotangents
    (shaped and typed like `outputs`) shared by all of them."""
    rng = np.random.default_rng(9)
    cot = [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in outputs]

    def loss(fn, diff):
        return sum(jnp.sum(o * c) for o, c in zip(fn({**args, **diff}), cot))

    diff = {k: args[k] for k in DIFF}
    return [jax.jit(jax.grad(lambda d, fn=fn: loss(fn, d)))(diff) for fn in fns]
