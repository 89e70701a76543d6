"""Image post-processing behind `--enable-difix`: a small convolutional net run on every rendered frame.

NRE's `--enable-difix` runs NVIDIA's DiFix diffusion model, a PyTorch checkpoint (`cosmos_3dgut.pt`)
fetched from `--difix-url` into `--difix-cache`. nurec-jax cannot download or run that checkpoint.
The flag instead loads a model in the format below from the same place, and start-up fails with a
message that says how to make one when none is there. The hook sits where NRE's does
(docs/wire.md#rgb-requests): render -> post-pass -> ego hood -> encode.

nurec-jax post-processing model v1
----------------------------------
One msgpack file, written with `flax.serialization.msgpack_serialize` (numpy arrays are flax's
msgpack extension type: dtype, shape, raw little-endian bytes), holding one map:

    format:      "nurec-jax-postprocess"
    version:     1
    resolution:  [H, W] ints, the working resolution (like --difix-resolution); [0, 0] = the
                 image's own size. Both zero or both positive.
    residual:    bool
    layers:      non-empty list of maps, applied in order:
                   kernel:     float32 [kh, kw, cin, cout], kh and kw odd
                   bias:       float32 [cout]
                   activation: "relu" or "none"
    description: optional str, free text (not used)

No other keys are allowed. The first layer's cin is 3 (RGB), each layer's cin is the previous
layer's cout, the last cout is 3; no NaN or inf anywhere. Each layer is a stride-1
cross-correlation with 'SAME' zero padding ((k - 1) / 2 zero pixels on each side), as in
`jax.lax.conv_general_dilated` / `flax.linen.Conv`:

    y[r, c, o] = bias[o] + sum_{i, j, ch} x[r + i - (kh - 1) / 2, c + j - (kw - 1) / 2, ch] * kernel[i, j, ch, o]

followed by the activation. With x the RGB image in [0, 1] at the working resolution:

    out = clip(x + net(x), 0, 1) if residual else clip(net(x), 0, 1)

`PostProcessor.__call__` resizes the image to the working resolution (bilinear), computes `out`
there, resizes it back to the image's size (bilinear) and clips again.

`tools/make_postprocess_model.py` writes such a file (identity, sharpen, warm colour grade):

    python tools/make_postprocess_model.py --kind=sharpen --output ~/.cache/nre/difix/cosmos_3dgut.msgpack
    serve-grpc --enable-difix --difix-model-filename cosmos_3dgut.msgpack ...

Working resolution precedence: in the server (`load_postprocessor`) `--difix-resolution` always
sets it, as NRE's flag does (`0 0` there means the image's own size); the model file's
`resolution` is only used when a `PostProcessor` is loaded directly from the library.

Jit boundary: `PostProcessor` owns it. `__call__` compiles once per input (H, W) and caches the
compiled function on the instance (thread-safe), so call it from host code, never inside a
`jax.jit` of your own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from nurec_jax.fileio import atomic_file
from nurec_jax.server import downloads

_LOGGER = logging.getLogger(__name__)

FORMAT = "nurec-jax-postprocess"
VERSION = 1
ACTIVATIONS = ("relu", "none")
Activation = Literal["relu", "none"]

_REQUIRED_KEYS = ("format", "version", "resolution", "residual", "layers")
_OPTIONAL_KEYS = ("description",)
_LAYER_KEYS = ("kernel", "bias", "activation")
_TORCH_SUFFIXES = (".pt", ".pth")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6 writes a zip archive
_TOOL = "python tools/make_postprocess_model.py"


@dataclasses.dataclass(frozen=True, eq=False)
class ConvLayer:
    """One convolution of the net.

    Attributes:
      kernel: float32 [kh, kw, cin, cout] (HWIO), kh and kw odd.
      bias: float32 [cout].
      activation: "relu" or "none", applied after the bias.
    """

    kernel: np.ndarray
    bias: np.ndarray
    activation: Activation = "none"


@dataclasses.dataclass(frozen=True, eq=False)
class PostProcessor:
    """A loaded "nurec-jax post-processing model v1" (format in the module docstring).

    Construction validates every field (ValueError naming it). Arrays stay on the host as float32
    numpy; they are put on the device on the first call.

    Attributes:
      layers: the convolutions, in order; first cin 3, last cout 3, shapes chaining.
      resolution: (H, W) working resolution; (0, 0) = run at the image's own size.
      residual: whether the net predicts a correction added to its input.
    """

    layers: tuple[ConvLayer, ...]
    resolution: tuple[int, int] = (0, 0)
    residual: bool = False
    # Compiled functions by input (H, W), and the device copy of the params ("params" key).
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(_check_layer(layer, i) for i, layer in enumerate(self.layers)))
        object.__setattr__(self, "resolution", _check_resolution(self.resolution, "resolution"))
        if not isinstance(self.residual, (bool, np.bool_)):
            raise ValueError(f"residual: expected a bool, got {self.residual!r}")
        object.__setattr__(self, "residual", bool(self.residual))
        if not self.layers:
            raise ValueError("layers: the net needs at least one layer")
        cin = 3
        for i, layer in enumerate(self.layers):
            if layer.kernel.shape[2] != cin:
                what = "the RGB input (3 channels)" if i == 0 else f"layers[{i - 1}]'s {cin} output channels"
                raise ValueError(
                    f"layers[{i}].kernel: shape {list(layer.kernel.shape)} has cin="
                    f"{layer.kernel.shape[2]}, which does not chain with {what}"
                )
            cin = layer.kernel.shape[3]
        if cin != 3:
            raise ValueError(
                f"layers[{len(self.layers) - 1}].kernel: the last layer must output 3 channels (RGB), got cout={cin}"
            )

    # --- serialisation ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, model: Mapping[str, Any]) -> PostProcessor:
        """Builds from the format's map (as `msgpack_restore` returns it). Raises ValueError naming the bad key."""
        if not isinstance(model, Mapping):
            raise ValueError(f"model: expected a map at the top level, got {type(model).__name__}")
        unknown = sorted(str(k) for k in model if k not in _REQUIRED_KEYS + _OPTIONAL_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; allowed: {list(_REQUIRED_KEYS + _OPTIONAL_KEYS)}")
        missing = [k for k in _REQUIRED_KEYS if k not in model]
        if missing:
            raise ValueError(f"missing key(s) {missing}")
        if model["format"] != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, got {model['format']!r}")
        version = model["version"]
        if isinstance(version, bool) or version != VERSION:
            raise ValueError(f"version: this nurec-jax reads version {VERSION}, got {version!r}")
        if "description" in model and not isinstance(model["description"], str):
            raise ValueError(f"description: expected a str, got {type(model['description']).__name__}")
        layers = model["layers"]
        if not isinstance(layers, (list, tuple)):
            raise ValueError(f"layers: expected a list, got {type(layers).__name__}")
        parsed = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, Mapping):
                raise ValueError(f"layers[{i}]: expected a map, got {type(layer).__name__}")
            keys = set(layer)
            if keys != set(_LAYER_KEYS):
                raise ValueError(f"layers[{i}]: keys must be {list(_LAYER_KEYS)}, got {sorted(map(str, keys))}")
            for name in ("kernel", "bias"):
                value = layer[name]
                if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                    got = f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
                    raise ValueError(f"layers[{i}].{name}: expected a float32 array, got {got}")
            parsed.append(ConvLayer(layer["kernel"], layer["bias"], layer["activation"]))
        return cls(tuple(parsed), resolution=model["resolution"], residual=model["residual"])

    def to_dict(self, description: str | None = None) -> dict[str, Any]:
        """The format's map (arrays as float32 numpy)."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "resolution": list(self.resolution),
            "residual": self.residual,
            "layers": [
                {"kernel": layer.kernel, "bias": layer.bias, "activation": layer.activation} for layer in self.layers
            ],
        }
        if description is not None:
            out["description"] = description
        return out

    @classmethod
    def load(cls, path: str) -> PostProcessor:
        """Reads and validates a model file. Raises ValueError (PyTorch checkpoints get their own message)."""
        path = os.path.expanduser(path)
        with open(path, "rb") as f:
            data = f.read()
        torch_reason = _torch_checkpoint_reason(path, data[:8])
        if torch_reason:
            raise _torch_error(path, torch_reason)
        try:
            model = serialization.msgpack_restore(data)
        except Exception as e:  # msgpack raises several unrelated types for corrupt input
            raise ValueError(
                f"{path}: not a nurec-jax post-processing model (msgpack could not read it: "
                f"{type(e).__name__}: {e}). {_how_to_make(path)}"
            ) from None
        try:
            return cls.from_dict(model)
        except ValueError as e:
            raise ValueError(f"{path}: invalid nurec-jax post-processing model: {e}") from None

    def save(self, path: str, description: str | None = None) -> None:
        """Writes the model file atomically (temporary file in the same directory, then rename)."""
        data = serialization.msgpack_serialize(self.to_dict(description))
        with atomic_file(os.path.expanduser(path)) as f:
            f.write(data)

    def with_resolution(self, resolution: tuple[int, int]) -> PostProcessor:
        """The same net at another working resolution ((0, 0) = the image's own size)."""
        return PostProcessor(self.layers, resolution=tuple(resolution), residual=self.residual)

    def describe(self) -> str:
        """One line: layers, residual, working resolution."""
        convs = ", ".join(
            "{}x{} {}->{}".format(*layer.kernel.shape) + (" relu" if layer.activation == "relu" else "")
            for layer in self.layers
        )
        res = "native" if self.resolution == (0, 0) else f"{self.resolution[0]}x{self.resolution[1]}"
        return f"{len(self.layers)} layer(s) [{convs}], residual={self.residual}, working resolution {res}"

    # --- the hook --------------------------------------------------------------------------------

    def __call__(self, rgb) -> np.ndarray:
        """Post-processes one image.

        Args:
          rgb: [H, W, 3] float image in [0, 1], numpy or jax.

        Returns:
          float32 numpy [H, W, 3] in [0, 1].
        """
        shape = tuple(np.shape(rgb))
        if len(shape) != 3 or shape[2] != 3 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"rgb: expected an [H, W, 3] image, got shape {list(shape)}")
        fn, params = self._compiled(shape[0], shape[1])
        return np.asarray(fn(params, jnp.asarray(rgb, dtype=jnp.float32)))

    def precompile(self, height: int, width: int) -> None:
        """Compiles for [height, width, 3] inputs now (e.g. during server warm-up)."""
        self._compiled(height, width)

    def compiled_sizes(self) -> list[tuple[int, int]]:
        """The input (H, W) sizes compiled so far."""
        with self._lock:
            return sorted(k for k in self._cache if k != "params")

    def _compiled(self, height: int, width: int):
        key = (int(height), int(width))
        with self._lock:
            if "params" not in self._cache:
                self._cache["params"] = jax.device_put([(layer.kernel, layer.bias) for layer in self.layers])
            params = self._cache["params"]
            fn = self._cache.get(key)
            if fn is None:
                work = key if self.resolution == (0, 0) else self.resolution
                forward = functools.partial(
                    _forward,
                    working_hw=work,
                    residual=self.residual,
                    activations=tuple(layer.activation for layer in self.layers),
                )
                spec = jax.ShapeDtypeStruct((*key, 3), jnp.float32)
                fn = jax.jit(forward).lower(params, spec).compile()
                self._cache[key] = fn
        return fn, params


def _forward(params, rgb, *, working_hw: tuple[int, int], residual: bool, activations: tuple[str, ...]):
    """Returns the post-processed [H, W, 3] image (traced; static config keyword-only)."""
    height, width = rgb.shape[:2]
    resize = tuple(working_hw) != (height, width)
    x = jax.image.resize(rgb, (*working_hw, 3), "bilinear") if resize else rgb
    y = x[None]
    for (kernel, bias), activation in zip(params, activations):
        # HIGHEST: no TF32 on GPUs, so results match the float32 definition of the format.
        y = (
            jax.lax.conv_general_dilated(
                y,
                kernel,
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=jax.lax.Precision.HIGHEST,
            )
            + bias
        )
        if activation == "relu":
            y = jax.nn.relu(y)
    y = y[0]
    out = jnp.clip(x + y if residual else y, 0.0, 1.0)
    if resize:
        out = jnp.clip(jax.image.resize(out, (height, width, 3), "bilinear"), 0.0, 1.0)
    return out


def _check_layer(layer: ConvLayer, i: int) -> ConvLayer:
    if not isinstance(layer, ConvLayer):
        raise ValueError(f"layers[{i}]: expected a ConvLayer, got {type(layer).__name__}")
    kernel = np.array(layer.kernel, dtype=np.float32)  # a writable copy; flax restores read-only views
    bias = np.array(layer.bias, dtype=np.float32)
    if kernel.ndim != 4:
        raise ValueError(f"layers[{i}].kernel: expected [kh, kw, cin, cout], got shape {list(kernel.shape)}")
    kh, kw, _, cout = kernel.shape
    if min(kernel.shape) < 1:
        raise ValueError(f"layers[{i}].kernel: empty shape {list(kernel.shape)}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"layers[{i}].kernel: kernel size {kh}x{kw} must be odd ('SAME' padding is centred)")
    if bias.shape != (cout,):
        raise ValueError(f"layers[{i}].bias: expected shape [{cout}] (the kernel's cout), got {list(bias.shape)}")
    for name, value in (("kernel", kernel), ("bias", bias)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"layers[{i}].{name}: contains NaN or inf")
    if layer.activation not in ACTIVATIONS:
        raise ValueError(f"layers[{i}].activation: expected one of {list(ACTIVATIONS)}, got {layer.activation!r}")
    return ConvLayer(kernel, bias, layer.activation)


def _check_resolution(value, name: str) -> tuple[int, int]:
    try:
        h, w = value
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected [H, W] integers, got {value!r}")
    h, w = int(h), int(w)
    if not ((h == 0 and w == 0) or (h > 0 and w > 0)):
        raise ValueError(f"{name}: expected positive [H, W], or [0, 0] for the image's own size, got {[h, w]}")
    return h, w


# --- finding the model at server start-up ------------------------------------------------------------


def _torch_checkpoint_reason(name: str, head: bytes) -> str | None:
    """Why `name`/`head` (the file's first bytes) look like a PyTorch checkpoint, or None."""
    base = urllib.parse.urlparse(name).path if "://" in name else name
    if base.lower().endswith(_TORCH_SUFFIXES):
        return f"its name ends in {os.path.splitext(base)[1]!r}"
    if head.startswith(_ZIP_MAGIC):
        return "it is a zip archive (torch.save's format)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "it starts with a Python pickle header (legacy torch.save format)"
    return None


def _how_to_make(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0] or "model"
    target = os.path.join(os.path.dirname(path), stem + ".msgpack")
    return (
        f"nurec-jax reads a 'nurec-jax post-processing model v1' (msgpack; see "
        f"nurec_jax/server/postprocess.py). Create one with\n"
        f"  {_TOOL} --kind=sharpen --output {target}\n"
        f"and start with --enable-difix --difix-cache {os.path.dirname(path)} "
        f"--difix-model-filename {os.path.basename(target)}"
    )


class _PyTorchCheckpointError(ValueError):
    """The model file (or URL) is a PyTorch checkpoint."""


def _torch_error(shown: str, reason: str, target: str | None = None) -> _PyTorchCheckpointError:
    """`shown`: the file or URL refused; `target`: the model path to suggest (default `shown`)."""
    return _PyTorchCheckpointError(
        f"{shown} looks like a PyTorch checkpoint ({reason}). NVIDIA's DiFix model (cosmos_3dgut.pt) is a "
        f"PyTorch checkpoint, which nurec-jax cannot load or run. {_how_to_make(target or shown)}"
    )


def _missing_message(path: str, detail: str) -> str:
    return (
        f"--enable-difix: no post-processing model found: looked for {path} (--difix-cache/"
        f"--difix-model-filename); {detail}. NVIDIA's DiFix PyTorch checkpoint cannot be downloaded "
        f"or run by nurec-jax. {_how_to_make(path)}"
    )


def _read_head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def resolve_model_path(
    difix_cache: str,
    difix_model_filename: str,
    difix_url: str | None,
    policy: downloads.DestinationPolicy = downloads.DestinationPolicy(),
    limits: downloads.Limits = downloads.Limits(),
) -> str:
    """Finds the post-processing model file, downloading it into the cache when needed.

    `<difix_cache>/<difix_model_filename>` (`~` expanded) is used when it exists. Otherwise `difix_url`
    is downloaded there by the server's one hardened downloader (`downloads.fetch_file`: http(s) only,
    destinations checked by `policy`, bounded by `limits`, written atomically). A model on local disk is
    placed in the cache directory under its file name, never named by URL, so the flag cannot be used to
    read local files. A PyTorch checkpoint (name ending in .pt/.pth, zip or pickle header) is refused,
    before downloading when the URL's name says so. Beyond that check, `PostProcessor.load` validates
    the content.

    Returns:
      The model file's path.

    Raises:
      ValueError: nothing found or fetchable, or a PyTorch checkpoint; the message names the path
        looked for and how to create a model in nurec-jax's format.
    """
    cache = os.path.expanduser(difix_cache)
    path = os.path.join(cache, difix_model_filename)
    if os.path.isfile(path):
        reason = _torch_checkpoint_reason(path, _read_head(path))
        if reason:
            raise _torch_error(path, reason)
        return path
    if not difix_url:
        hint = ""
        if difix_model_filename.lower().endswith(_TORCH_SUFFIXES):
            hint = (
                " (a name ending in .pt/.pth, like NRE's default cosmos_3dgut.pt, is a PyTorch checkpoint; "
                "choose another --difix-model-filename)"
            )
        raise ValueError(_missing_message(path, f"the file does not exist and --difix-url is not set{hint}"))
    reason = _torch_checkpoint_reason(difix_model_filename, b"")
    if reason:  # refuse before fetching something that could never be loaded under this name
        raise _torch_error(f"--difix-model-filename {difix_model_filename!r}", reason, path)
    try:
        downloads.check_url(difix_url, f"copy a local model to {path}")
    except downloads.DownloadError as e:
        raise ValueError(
            _missing_message(path, f"the file does not exist and --difix-url {difix_url!r}: {e}")
        ) from None
    reason = _torch_checkpoint_reason(difix_url, b"")
    if reason:
        raise _torch_error(difix_url, reason, path)

    def no_checkpoint(tmp: str) -> None:
        reason = _torch_checkpoint_reason("", _read_head(tmp))
        if reason:
            raise _torch_error(difix_url, reason, path)

    try:
        downloads.fetch_file(difix_url, path, policy, limits, validate=no_checkpoint)
    except downloads.DownloadError as e:
        raise ValueError(
            _missing_message(path, f"the file does not exist and downloading --difix-url {difix_url} failed ({e})")
        ) from None
    _LOGGER.info("downloaded post-processing model %s -> %s", difix_url, path)
    return path


def load_postprocessor(
    difix_cache: str,
    difix_model_filename: str,
    difix_url: str | None,
    difix_resolution: tuple[int, int] | None,
    policy: downloads.DestinationPolicy = downloads.DestinationPolicy(),
    limits: downloads.Limits = downloads.Limits(),
) -> PostProcessor:
    """The server's `--enable-difix` start-up step: resolve, load, set the working resolution.

    Args:
      difix_cache, difix_model_filename, difix_url, policy, limits: as `resolve_model_path`.
      difix_resolution: (H, W) from `--difix-resolution`. It always sets the working resolution,
        as NRE's flag does; (0, 0) runs at each image's own size. None keeps the model file's.

    Raises:
      ValueError: the model is missing, unfetchable, a PyTorch checkpoint or invalid; the message
        says what to do.
    """
    path = resolve_model_path(difix_cache, difix_model_filename, difix_url, policy, limits)
    processor = PostProcessor.load(path)
    if difix_resolution is not None:
        processor = processor.with_resolution(_check_resolution(tuple(difix_resolution), "--difix-resolution"))
    _LOGGER.info("post-processing model %s: %s", path, processor.describe())
    return processor
