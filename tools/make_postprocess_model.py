"""Writes a "nurec-jax post-processing model v1" file, the model `serve-grpc --enable-difix` loads.

NVIDIA's DiFix checkpoint (a PyTorch file) cannot be run by nurec-jax; this script makes a small
fixed-weight model in nurec-jax's own format (nurec_jax/server/postprocess.py) instead:

  identity  one 1x1 layer with the identity matrix: output = input (for checking the plumbing)
  sharpen   one 3x3 residual layer, an unsharp mask: out = x + amount * (x - blur3x3(x)); the
            padding is zeros, so the outermost pixel ring gets slightly brighter
  warm      one 1x1 colour matrix + bias: a slight warm grade (more red, less blue)

Put it where `--enable-difix` looks (`--difix-cache`/`--difix-model-filename`):

    python tools/make_postprocess_model.py --kind=sharpen --output ~/.cache/nre/difix/cosmos_3dgut.msgpack
    serve-grpc --enable-difix --difix-model-filename cosmos_3dgut.msgpack ...

`--resolution H W` is the model's working resolution ([0, 0], the default, = each image's own
size). The server's `--difix-resolution` overrides it; it matters when the model is used from
the library.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from nurec_jax.cli import _flags
from nurec_jax.server.postprocess import ConvLayer, PostProcessor

_KIND = flags.DEFINE_enum("kind", "sharpen", ["identity", "sharpen", "warm"], "Which fixed-weight model to write.")
_OUTPUT = flags.DEFINE_string("output", None, "Model file to write (.msgpack).", required=True)
_RESOLUTION = flags.DEFINE_list("resolution", ["0", "0"], "Working resolution H W; 0 0 = the image's own size.")
_AMOUNT = flags.DEFINE_float("amount", 0.5, "Sharpen strength (--kind=sharpen).")

_BLUR_3X3 = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
# Warm grade: out = _WARM_MATRIX @ rgb + _WARM_BIAS (rows: output R, G, B).
_WARM_MATRIX = np.array([[1.06, 0.02, 0.00], [0.01, 1.01, 0.00], [0.00, 0.00, 0.90]])
_WARM_BIAS = np.array([0.01, 0.005, -0.01])


def _per_channel(taps: np.ndarray) -> np.ndarray:
    """[kh, kw] taps applied to each RGB channel separately -> kernel [kh, kw, 3, 3]."""
    return np.einsum("hw,io->hwio", taps, np.eye(3)).astype(np.float32)


def make_model(kind: str, resolution: tuple[int, int] = (0, 0), amount: float = 0.5) -> PostProcessor:
    """The fixed-weight model `kind` (identity, sharpen or warm)."""
    zeros = np.zeros(3, np.float32)
    if kind == "identity":
        layers, residual = (ConvLayer(_per_channel(np.ones((1, 1))), zeros),), False
    elif kind == "sharpen":
        delta = np.zeros((3, 3))
        delta[1, 1] = 1.0
        layers, residual = (ConvLayer(_per_channel(amount * (delta - _BLUR_3X3)), zeros),), True
    elif kind == "warm":
        # kernel[0, 0, cin, cout] = matrix[cout, cin]
        layers = (ConvLayer(_WARM_MATRIX.T[None, None].astype(np.float32), _WARM_BIAS.astype(np.float32)),)
        residual = False
    else:
        raise ValueError(f"kind: expected identity, sharpen or warm, got {kind!r}")
    return PostProcessor(layers, resolution=resolution, residual=residual)


def _main(argv):
    del argv
    resolution = _flags.height_width(_RESOLUTION.value, "resolution")
    try:
        model = make_model(_KIND.value, resolution, _AMOUNT.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    output = os.path.expanduser(_OUTPUT.value)
    model.save(output, description=f"tools/make_postprocess_model.py --kind={_KIND.value}")
    PostProcessor.load(output)  # what the server will do
    print(f"wrote {output} ({os.path.getsize(output)} bytes): kind={_KIND.value}, {model.describe()}")
    print(
        f"use it with: serve-grpc --enable-difix --difix-cache {os.path.dirname(os.path.abspath(output))} "
        f"--difix-model-filename {os.path.basename(output)}"
    )


def main():
    app.run(_main, flags_parser=_flags.parser({"resolution": 2}))


if __name__ == "__main__":
    main()
