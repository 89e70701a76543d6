"""The `--enable-difix` post-processing hook: model format, numerics, validation, model lookup."""

import contextlib
import os
import pickle
import subprocess
import sys
import threading
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from nurec_jax.server import metrics
from nurec_jax.server.downloads import DestinationPolicy, Limits
from nurec_jax.server.postprocess import ConvLayer, PostProcessor, load_postprocessor, resolve_model_path

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# float32 conv (HIGHEST precision) against a float64 numpy reference, values O(1), <= 27 terms per sum.
_ATOL = 1e-5


def _two_layer(seed=0, residual=False, resolution=(0, 0)) -> PostProcessor:
    rng = np.random.default_rng(seed)
    return PostProcessor(
        (
            ConvLayer(
                rng.normal(0, 0.3, (3, 3, 3, 4)).astype(np.float32), rng.normal(0, 0.1, 4).astype(np.float32), "relu"
            ),
            ConvLayer(
                rng.normal(0, 0.3, (5, 3, 4, 3)).astype(np.float32), rng.normal(0.3, 0.1, 3).astype(np.float32), "none"
            ),
        ),
        resolution=resolution,
        residual=residual,
    )


def _image(h=12, w=16, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (h, w, 3)).astype(np.float32)


def _smooth_image(h=12, w=16) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [
            0.5 + 0.3 * np.sin(2 * np.pi * xx / w + 0.3) * np.cos(2 * np.pi * yy / (2 * h)),
            0.4 + 0.02 * xx + 0.01 * yy,
            0.6 - 0.2 * np.cos(np.pi * yy / h),
        ],
        -1,
    ).astype(np.float32)


def _conv_ref(x, kernel, bias):
    """'SAME' zero-padded cross-correlation, written out: np.pad + one shifted product per tap."""
    kh, kw = kernel.shape[:2]
    h, w = x.shape[:2]
    xp = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.broadcast_to(bias.astype(np.float64), (h, w, kernel.shape[3])).copy()
    for i in range(kh):
        for j in range(kw):
            out += xp[i : i + h, j : j + w] @ kernel[i, j].astype(np.float64)
    return out


def _model_ref(model: PostProcessor, x):
    y = x.astype(np.float64)
    for layer in model.layers:
        y = _conv_ref(y, layer.kernel, layer.bias)
        if layer.activation == "relu":
            y = np.maximum(y, 0)
    return np.clip(x + y if model.residual else y, 0, 1)


def _valid_dict():
    return _two_layer().to_dict()


# --- format and numerics -------------------------------------------------------------------------


def test_round_trip(tmp_path):
    model = _two_layer(residual=True, resolution=(6, 8))
    path = tmp_path / "m.msgpack"
    model.save(str(path), description="two layers")
    assert [p.name for p in tmp_path.iterdir()] == ["m.msgpack"]  # no temporary file left
    raw = serialization.msgpack_restore(path.read_bytes())
    assert raw["format"] == "nurec-jax-postprocess" and raw["version"] == 1 and raw["description"] == "two layers"
    back = PostProcessor.load(str(path))
    assert back.resolution == (6, 8) and back.residual is True
    for a, b in zip(model.layers, back.layers):
        np.testing.assert_array_equal(a.kernel, b.kernel)
        np.testing.assert_array_equal(a.bias, b.bias)
        assert a.activation == b.activation and b.kernel.dtype == np.float32


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("resolution", [(0, 0), (12, 16)])  # both mean "no resize" for a 12x16 image
def test_matches_numpy_reference(residual, resolution):
    model = _two_layer(residual=residual, resolution=resolution)
    img = _image()
    out = model(img)
    assert out.shape == (12, 16, 3) and out.dtype == np.float32
    expected = _model_ref(model, img)
    np.testing.assert_allclose(out, expected, atol=_ATOL, err_msg=f"{residual=} {resolution=}")
    assert 0 < np.mean((expected > 0) & (expected < 1))  # not everything clipped
    # residual really adds the input: the same net differs from the other mode by +x (before the clip)
    other = PostProcessor(model.layers, resolution=resolution, residual=not residual)
    assert np.abs(other(img) - out).max() > 0.05


def test_clip_and_jax_input():
    ones = ConvLayer(np.zeros((1, 1, 3, 3), np.float32), np.array([5.0, -5.0, 0.25], np.float32))
    img = _image()
    out = PostProcessor((ones,))(jnp.asarray(img))
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out[..., 0], 1.0)
    np.testing.assert_array_equal(out[..., 1], 0.0)
    np.testing.assert_allclose(out[..., 2], 0.25)
    res = PostProcessor((ones,), residual=True)(img)
    np.testing.assert_array_equal(res[..., :2], np.stack([np.ones((12, 16)), np.zeros((12, 16))], -1))
    np.testing.assert_allclose(res[..., 2], np.clip(img[..., 2] + 0.25, 0, 1), atol=1e-6)


# Bilinear resize to the working resolution and back is not exact; for this smooth 12x16 image the
# round trip was measured at 0.024 (24x32), 0.019 (10x20), 0.021 (576x1024) and 0.074 (6x8, which
# drops half the samples) max abs error.
@pytest.mark.parametrize("resolution,tol", [((24, 32), 0.04), ((10, 20), 0.04), ((6, 8), 0.1)])
def test_resize_path_identity(resolution, tol):
    identity = ConvLayer(np.eye(3, dtype=np.float32)[None, None], np.zeros(3, np.float32))
    img = _smooth_image()
    out = PostProcessor((identity,), resolution=resolution)(img)
    assert out.shape == img.shape and out.dtype == np.float32
    assert np.abs(out - img).max() < tol
    assert out.min() >= 0 and out.max() <= 1


def test_input_shape_checked():
    with pytest.raises(ValueError, match=r"rgb: expected an \[H, W, 3\] image, got shape \[12, 16, 4\]"):
        _two_layer()(np.zeros((12, 16, 4), np.float32))


@contextlib.contextmanager
def _executables_built_by_this_thread():
    """Yields a list that gets one entry per executable this thread builds (compiled, or loaded from the
    persistent compilation cache), as JAX reports them through `jax.monitoring`. Other threads are left out:
    a server another test left running may compile meanwhile."""
    me, built = threading.get_ident(), []

    def on_duration(event, duration_secs, **kwargs):
        if event == metrics.BACKEND_COMPILE_EVENT and threading.get_ident() == me:
            built.append(duration_secs)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        yield built
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)


def test_jit_cache_per_size():
    model = _two_layer()
    with _executables_built_by_this_thread() as built:
        for h, w in [(12, 16), (12, 16), (8, 8), (12, 16), (8, 8)]:
            model(_image(h, w))
        assert model.compiled_sizes() == [(8, 8), (12, 16)] and len(built) == 2  # one compile per size
        model.precompile(4, 6)
        assert model.compiled_sizes() == [(4, 6), (8, 8), (12, 16)] and len(built) == 3
    # a new working resolution is a new processor with its own cache
    assert model.with_resolution((6, 8)).compiled_sizes() == []


# --- validation ----------------------------------------------------------------------------------


def _set(d, path, value):
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = d
    for k in keys[:-1]:
        target = target[k]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


_DELETE = object()
_F = np.float32


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("format", "difix", r"format: expected 'nurec-jax-postprocess', got 'difix'"),
        ("version", 2, r"version: this nurec-jax reads version 1, got 2"),
        ("version", True, r"version: .* got True"),
        ("resolution", [576], r"resolution: expected \[H, W\] integers"),
        ("resolution", [576, 0], r"resolution: expected positive \[H, W\], or \[0, 0\]"),
        ("resolution", [576.0, 1024.0], r"resolution: expected \[H, W\] integers"),
        ("residual", "yes", r"residual: expected a bool"),
        ("layers", [], r"layers: the net needs at least one layer"),
        ("layers", "conv", r"layers: expected a list"),
        ("layers.0", 3, r"layers\[0\]: expected a map"),
        ("layers.1.stride", 2, r"layers\[1\]: keys must be \['kernel', 'bias', 'activation'\]"),
        ("layers.0.kernel", np.zeros((3, 3, 4, 4), _F), r"layers\[0\].kernel: .*cin=4.*RGB input"),
        ("layers.1.kernel", np.zeros((5, 3, 5, 3), _F), r"layers\[1\].kernel: .*cin=5.*layers\[0\]'s 4 output"),
        (
            "layers.1",
            {"kernel": np.zeros((5, 3, 4, 2), _F), "bias": np.zeros(2, _F), "activation": "none"},
            r"layers\[1\].kernel: the last layer must output 3 channels \(RGB\), got cout=2",
        ),
        ("layers.0.kernel", np.zeros((2, 3, 3, 4), _F), r"layers\[0\].kernel: kernel size 2x3 must be odd"),
        ("layers.1.kernel", np.zeros((5, 4, 4, 3), _F), r"layers\[1\].kernel: kernel size 5x4 must be odd"),
        ("layers.0.kernel", np.zeros((3, 3, 3), _F), r"layers\[0\].kernel: expected \[kh, kw, cin, cout\]"),
        ("layers.0.kernel", np.zeros((3, 3, 3, 4)), r"layers\[0\].kernel: expected a float32 array, got dtype float64"),
        ("layers.0.kernel", [[1.0]], r"layers\[0\].kernel: expected a float32 array, got list"),
        ("layers.0.bias", np.zeros(3, _F), r"layers\[0\].bias: expected shape \[4\]"),
        ("layers.1.bias", np.array([0, np.nan, 0], _F), r"layers\[1\].bias: contains NaN or inf"),
        ("layers.0.kernel", np.full((3, 3, 3, 4), np.inf, _F), r"layers\[0\].kernel: contains NaN or inf"),
        ("layers.1.activation", "gelu", r"layers\[1\].activation: expected one of \['relu', 'none'\], got 'gelu'"),
        ("extra", 1, r"unknown key\(s\) \['extra'\]"),
        ("residual", _DELETE, r"missing key\(s\) \['residual'\]"),
        ("description", 3, r"description: expected a str"),
    ],
)
def test_validation_names_the_field(tmp_path, path, value, message):
    d = _valid_dict()
    _set(d, path, value)
    with pytest.raises(ValueError, match=message):
        PostProcessor.from_dict(d)
    # through a file too, with the path in front
    f = tmp_path / "bad.msgpack"
    f.write_bytes(serialization.msgpack_serialize(d))
    with pytest.raises(ValueError, match=f"{f}: invalid nurec-jax post-processing model: {message}"):
        PostProcessor.load(str(f))


def test_not_msgpack(tmp_path):
    f = tmp_path / "model.msgpack"
    f.write_bytes(b"\x05 hello")
    with pytest.raises(ValueError, match=r"not a nurec-jax post-processing model \(msgpack could not read it"):
        PostProcessor.load(str(f))
    f.write_bytes(serialization.msgpack_serialize([1, 2]))
    with pytest.raises(ValueError, match="model: expected a map at the top level, got list"):
        PostProcessor.load(str(f))


def _torch_like_files(d):
    """A .pt name with valid content, a zip (torch.save) and a pickle (legacy torch.save) in .msgpack files."""
    d.mkdir(exist_ok=True)
    named = d / "cosmos_3dgut.pt"
    _two_layer().save(str(named))
    zipped = d / "zip.msgpack"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", b"x")
    pickled = d / "pickle.msgpack"
    pickled.write_bytes(pickle.dumps({"state_dict": [1, 2]}, protocol=2))
    return {named: "name ends in '.pt'", zipped: "zip archive", pickled: "pickle header"}


def test_pytorch_checkpoints_refused(tmp_path):
    for f, reason in _torch_like_files(tmp_path / "src").items():
        for call in (lambda: PostProcessor.load(str(f)), lambda: resolve_model_path(str(f.parent), f.name, None)):
            with pytest.raises(ValueError, match="looks like a PyTorch checkpoint") as e:
                call()
            msg = str(e.value)
            assert reason in msg and "cannot load or run" in msg and "make_postprocess_model.py" in msg, msg
    good = tmp_path / "src" / "good.msgpack"
    _two_layer().save(str(good))
    with pytest.raises(ValueError, match=r"--difix-model-filename 'cosmos_3dgut.pt' looks like a PyTorch checkpoint"):
        resolve_model_path(str(tmp_path / "cache"), "cosmos_3dgut.pt", "https://example.com/good.msgpack")
    assert not (tmp_path / "cache").exists()  # refused before fetching
    pth = tmp_path / "src" / "difix.pth"
    pth.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"its name ends in '\.pth'"):
        PostProcessor.load(str(pth))


def test_missing_model_message(tmp_path):
    cache = tmp_path / "difix"
    with pytest.raises(ValueError) as e:
        resolve_model_path(str(cache), "cosmos_3dgut.pt", None)
    msg = str(e.value)
    assert f"looked for {cache / 'cosmos_3dgut.pt'}" in msg, msg
    assert "--difix-url is not set" in msg and "like NRE's default cosmos_3dgut.pt, is a PyTorch checkpoint" in msg
    assert "cannot be downloaded or run by nurec-jax" in msg
    assert f"make_postprocess_model.py --kind=sharpen --output {cache / 'cosmos_3dgut.msgpack'}" in msg
    assert "--difix-model-filename cosmos_3dgut.msgpack" in msg
    # The model URL goes through the server's one downloader: local paths are never read through it, and
    # whether such a file exists is not told.
    (tmp_path / "exists.msgpack").write_bytes(b"x")
    for url, detail in [
        (str(tmp_path / "nope.msgpack"), "local paths are not accepted"),
        (str(tmp_path / "exists.msgpack"), "local paths are not accepted"),
        (
            "file:///etc/passwd",
            "local paths are not accepted; give an http:// or https:// URL \\(copy a local model to ",
        ),
        ("s3://bucket/m.msgpack", "unsupported URL scheme 's3'"),
    ]:
        with pytest.raises(ValueError, match=f"looked for {cache / 'm.msgpack'}.*{detail}"):
            resolve_model_path(str(cache), "m.msgpack", url)
    assert not cache.exists()


def test_home_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c").mkdir()
    _two_layer().save(str(tmp_path / "c" / "m.msgpack"))
    assert resolve_model_path("~/c", "m.msgpack", None) == str(tmp_path / "c" / "m.msgpack")


def test_http_download_through_the_hardened_downloader(tmp_path, http_dir):
    www, base = http_dir  # a web server on 127.0.0.1
    _two_layer(residual=True).save(str(www / "model.msgpack"))
    cache = tmp_path / "cache"
    # Loopback is a private destination: refused like a scene URL unless the server allows it.
    with pytest.raises(
        ValueError,
        match=r"downloading --difix-url .* failed \(host '127.0.0.1' resolves to a "
        r"loopback address.*--download-allow-private",
    ):
        resolve_model_path(str(cache), "m.msgpack", f"{base}/model.msgpack")
    loopback = DestinationPolicy(allow_private=True)
    path = resolve_model_path(str(cache), "m.msgpack", f"{base}/model.msgpack", loopback)
    assert os.listdir(cache) == ["m.msgpack"]
    assert PostProcessor.load(path).residual is True
    with pytest.raises(
        ValueError,
        match=r"looked for .*other.msgpack.*downloading --difix-url .*/missing.msgpack "
        r"failed \(HTTP Error 404",
    ):
        resolve_model_path(str(cache), "other.msgpack", f"{base}/missing.msgpack", loopback)
    with pytest.raises(
        ValueError,
        match=r"failed \(the file is \d+ bytes, above the limit of 100 "
        r"\(--download-max-bytes\)",
    ):
        resolve_model_path(str(cache), "other.msgpack", f"{base}/model.msgpack", loopback, Limits(max_bytes=100))
    with zipfile.ZipFile(www / "ckpt.bin", "w") as z:
        z.writestr("data.pkl", b"x")
    with pytest.raises(ValueError, match=r"ckpt.bin looks like a PyTorch checkpoint \(it is a zip archive"):
        resolve_model_path(str(cache), "other.msgpack", f"{base}/ckpt.bin", loopback)
    with pytest.raises(ValueError, match=r"cosmos_3dgut.pt looks like a PyTorch checkpoint \(its name ends in '.pt'"):
        resolve_model_path(str(cache), "other.msgpack", f"{base}/cosmos_3dgut.pt", loopback)
    assert os.listdir(cache) == ["m.msgpack"]  # failures leave nothing behind


def test_load_postprocessor_resolution_precedence(tmp_path):
    _two_layer(resolution=(0, 0)).save(str(tmp_path / "native.msgpack"))
    _two_layer(resolution=(24, 32)).save(str(tmp_path / "fixed.msgpack"))
    assert load_postprocessor(str(tmp_path), "native.msgpack", None, (6, 8)).resolution == (6, 8)
    assert load_postprocessor(str(tmp_path), "fixed.msgpack", None, (576, 1024)).resolution == (576, 1024)
    assert load_postprocessor(str(tmp_path), "fixed.msgpack", None, (0, 0)).resolution == (0, 0)
    assert load_postprocessor(str(tmp_path), "fixed.msgpack", None, None).resolution == (24, 32)
    with pytest.raises(ValueError, match=r"--difix-resolution: expected positive \[H, W\]"):
        load_postprocessor(str(tmp_path), "fixed.msgpack", None, (-1, 8))
    out = load_postprocessor(str(tmp_path), "native.msgpack", None, (0, 0))(_image())
    np.testing.assert_allclose(out, _model_ref(_two_layer(), _image()), atol=_ATOL)


# --- the tool ------------------------------------------------------------------------------------


def test_tool_models():
    from tools import make_postprocess_model as tool

    img = _smooth_image()
    np.testing.assert_array_equal(tool.make_model("identity")(img), img)
    warm = tool.make_model("warm")(img)
    assert warm[..., 0].mean() > img[..., 0].mean() and warm[..., 2].mean() < img[..., 2].mean()
    flat = np.full((12, 16, 3), 0.5, np.float32)
    sharp = tool.make_model("sharpen", amount=0.5)(flat)
    np.testing.assert_allclose(sharp[1:-1, 1:-1], 0.5, atol=1e-6)  # a flat interior stays flat
    step = np.where(np.arange(16) < 8, 0.3, 0.7).astype(np.float32)[None, :, None] * np.ones((12, 1, 3), np.float32)
    sharp = tool.make_model("sharpen", amount=0.5)(step)
    assert sharp[5, 7, 0] < 0.3 and sharp[5, 8, 0] > 0.7  # overshoot on both sides of the edge


def test_tool_command_line(tmp_path):
    out = tmp_path / "difix" / "cosmos_3dgut.msgpack"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(_ROOT, "tools", "make_postprocess_model.py"),
            "--kind=warm",
            f"--output={out}",
            "--resolution",
            "576",
            "1024",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "working resolution 576x1024" in proc.stdout
    assert f"--enable-difix --difix-cache {out.parent} --difix-model-filename cosmos_3dgut.msgpack" in proc.stdout
    model = load_postprocessor(str(out.parent), out.name, None, (0, 0))
    assert model.resolution == (0, 0) and len(model.layers) == 1
