"""Static render configuration: `RenderOptions` (part of every jit cache key), the backend's compositor
choice and tile size. Block sizes and capacities the kernels share live in `nurec_jax.constants`."""

from __future__ import annotations

import dataclasses

import jax

from nurec_jax import constants as C


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """Static render configuration (part of the jit cache key).

    Attributes:
      pair_capacity: size of the (tile, Gaussian) pair buffer (the only capacity: tiles are ranges of the
        sorted pair list, so a long tile list costs no extra memory and never forces a recompile).
      chunk: Gaussians per unit of a tile's list (the Pallas kernel: per batch it loads).
      tile_batch: chunk-sized units of the pair list (of any tiles) composited side by side per step by the
        reference compositor. 16 x 64 measured best of (8, 16, 32, 64) x (16, 32, 64, 128) on the sample
        at 640x360, 2-core CPU (BUILD_NOTES, "Measured").
      rolling_shutter_iterations: fixed-point iterations when projecting under a rolling shutter.
      disable_rolling_shutter: render every pixel at the start pose (render-grpc's option).
      implementation: compositor: "reference" (plain jnp), "pallas" (the Triton kernel; interpret mode
        off GPU), or "auto" (pallas on GPU, reference elsewhere).
      tile_size: pixels per tile side (a power of two), 0 for the backend's choice (`tile_size_for`):
        16 for the Pallas kernel (one GPU program per 16x16 tile), 8 for the reference compositor, whose
        cost is pairs x pixels per tile: street-scale Gaussians cover a few pixels, so 8x8 tiles evaluate
        2.2x fewer (pixel, Gaussian) pairs than 16x16 on the sample (BUILD_NOTES, Renderer, "Tile size").
    """

    pair_capacity: int = C.PAIR_CAPACITY
    chunk: int = C.COMPOSITE_CHUNK
    tile_batch: int = C.COMPOSITE_UNITS_PER_STEP
    rolling_shutter_iterations: int = C.ROLLING_SHUTTER_ITERATIONS
    disable_rolling_shutter: bool = False
    implementation: str = "auto"
    tile_size: int = 0


def resolved_implementation(impl: str) -> str:
    """ "reference" or "pallas" for an implementation name (see RenderOptions) on this backend."""
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl not in ("reference", "pallas"):
        raise ValueError(f"implementation must be 'auto', 'reference' or 'pallas', got {impl!r}")
    return impl


def tile_size_for(options: RenderOptions) -> int:
    """Pixels per tile side for `options` (see RenderOptions.tile_size)."""
    if options.tile_size:
        t = options.tile_size
        if t < 2 or t & (t - 1):
            raise ValueError(f"tile_size must be a power of two >= 2, got {t}")
        return t
    return C.TILE_SIZE if resolved_implementation(options.implementation) == "pallas" else C.REFERENCE_TILE_SIZE
