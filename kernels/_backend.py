"""Backend choice for the Pallas kernels (jax_pallas.md section 0).

GPU kernels are written against Pallas' Triton lowering, selected explicitly with
`compiler_params=plt.CompilerParams(...)` (on JAX 0.11.2 `pallas_call` on CUDA always lowers to
Triton; the backend is deprecated since 0.11.0 but present through 0.12). Everywhere else the same
kernels run in interpret mode.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as plt  # noqa: F401  (re-exported for the kernels)


def resolve_interpret(interpret: bool | None = None) -> bool:
    """Interpret mode unless the default backend is a GPU (or the caller decides)."""
    if interpret is not None:
        return bool(interpret)
    return jax.default_backend() != "gpu"


def compiler_params(num_warps: int = 4, num_stages: int = 1):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


