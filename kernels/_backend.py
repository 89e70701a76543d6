"""Backend choice for the Pallas kernels (docs/jax_notes.md#pallas-backend).

GPU kernels are written against Pallas' Triton lowering, selected explicitly with
`compiler_params=plt.CompilerParams(...)` (on JAX 0.11.2 `pallas_call` on CUDA always lowers to
Triton; the backend is deprecated since 0.11.0 but present through 0.12). Everywhere else the same
kernels run in interpret mode.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas.fuser  # noqa: F401  (see below)
from jax.experimental.pallas import triton as plt  # noqa: F401  (re-exported for the kernels)

# Pallas registers the trace-context option `pallas_fuser_disable_nested_fuse` when its fuser module is
# first imported, which otherwise happens inside the first pallas_call trace: every function jitted before
# that point would then miss the jit cache once (one extra compile of the first render). Importing it here,
# when nurec_jax.render is imported, keeps the trace context fixed from the start.


def resolve_interpret(interpret: bool | None = None) -> bool:
    """Interpret mode unless the default backend is a GPU (or the caller decides)."""
    if interpret is not None:
        return bool(interpret)
    return jax.default_backend() != "gpu"


def compiler_params(num_warps: int = 4, num_stages: int = 1):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
