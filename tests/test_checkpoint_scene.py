"""A NuRec model saved by real PyTorch (`tests/data/checkpoints/gaussian_scene.ckpt`, written by
`tools/make_checkpoint_fixtures.py` with torch 2.13) loads from a checkpoint-only `.usdz` exactly as
the `.nurec` payload of the same tensors does (identical arrays, hence identical images; the
rendered comparison of a checkpoint-only artifact and its payload twin is in
test_artifact_variants.py)."""

from __future__ import annotations

import os

import handmade as hm
import numpy as np
import pytest
import yaml

from nurec_jax import scene as S
from nurec_jax.errors import SceneFormatError

DATA = os.path.join(os.path.dirname(__file__), "data", "checkpoints")
CONFIG = {
    "layers": {"background": hm.layer_config(o0=True), "dynamic_rigids": hm.layer_config(o0=True)},
    "background": {"name": "sky-env-map", "envmap_type": "cubemap"},
}


def _arrays():
    with np.load(os.path.join(DATA, "gaussian_scene.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt_scene")
    with open(os.path.join(DATA, "gaussian_scene.ckpt"), "rb") as f:
        ckpt = f.read()
    ckpt_path = d / "ckpt.usdz"
    hm.usdz(
        ckpt_path,
        [
            ("checkpoint.ckpt", ckpt),
            ("parsed_config.yaml", yaml.safe_dump({"version": "26.4.111", "model": CONFIG}).encode()),
        ],
    )
    state = {}
    for key, value in _arrays().items():  # the same tensors as a .nurec payload (float16, `.` keys)
        dtype = np.float16 if value.dtype == np.float32 else value.dtype
        hm.tensor(state, "." + key[len("model.") :], value, dtype)
    for layer in ("background", "dynamic_rigids"):
        state[f".gaussians_nodes.{layer}._extra_state"] = {"n_active_features": 3}
    state["._extra_state"] = {"obj_track_ids": {"dynamic_rigids": ["5@clipgt-fixture"]}}
    nurec_path = d / "nurec.usdz"
    hm.usdz(nurec_path, [("volume.nurec", hm.payload(state, CONFIG))])
    return S.load_host_scene(str(ckpt_path)), S.load_host_scene(str(nurec_path))


def test_checkpoint_and_payload_decode_to_the_same_layers(scenes):
    ckpt, nurec = scenes
    assert ckpt.report.sources == ("checkpoint.ckpt",)
    assert [l.name for l in ckpt.report.layers] == ["background", "dynamic_rigids"]
    for a, b in zip(ckpt.static_layers + ckpt.rigid_layers, nurec.static_layers + nurec.rigid_layers):
        for field in ("means", "quats", "scales", "opacities", "sh"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{a.name}.{field}")
        assert a.sh_degree == b.sh_degree == 3
    assert ckpt.rigid_layers[0].track_ids == ("5",)
    np.testing.assert_array_equal(ckpt.sky_cubemap, nurec.sky_cubemap)


def test_checkpoint_values_are_the_activated_tensors(scenes):
    """Against an independent computation from the tensors torch saved."""
    ckpt, _ = scenes
    a = _arrays()
    pre = "model.gaussians_nodes.background."
    bg = ckpt.static_layers[0]
    np.testing.assert_allclose(bg.means, a[pre + "positions"], rtol=1e-6)  # no world_to_nre: identity
    np.testing.assert_allclose(bg.opacities, 1 / (1 + np.exp(-a[pre + "densities"][:, 0])), rtol=1e-5)
    np.testing.assert_allclose(bg.scales, np.exp(a[pre + "scales"]), rtol=1e-5)
    q = a[pre + "rotations"]
    np.testing.assert_allclose(bg.quats, q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(bg.sh[:, 0], (a[pre + "features_albedo"] - 0.5) / 0.28209479177387814, rtol=1e-5)


def test_missing_config_loads_with_a_warning_and_bad_config_is_named(tmp_path):
    with open(os.path.join(DATA, "gaussian_scene.ckpt"), "rb") as f:
        ckpt = f.read()
    path = tmp_path / "noconfig.usdz"
    hm.usdz(path, [("checkpoint.ckpt", ckpt)])
    host = S.load_host_scene(str(path))
    assert any("no parsed_config.yaml" in w for w in host.report.warnings)
    bad = {"model": {"layers": {"background": {"particle": {"radiance_sph_degree": "${model.sh}"}}}}}
    path = tmp_path / "badconfig.usdz"
    hm.usdz(path, [("checkpoint.ckpt", ckpt), ("parsed_config.yaml", yaml.safe_dump(bad).encode())])
    with pytest.raises(
        SceneFormatError,
        match=r"badconfig.usdz:parsed_config.yaml: model\.layers\.background\.particle\.radiance_sph_degree: "
        r"expected an integer, got '\$\{model.sh\}'",
    ):
        S.load_host_scene(str(path))
