"""Malformed scene files are rejected with errors that name the problem and the member."""

import gzip
import os
import zipfile

import handmade as hm
import msgpack
import numpy as np
import pytest

import nurec_jax
from nurec_jax import SceneFormatError, UnsupportedSceneError


def _good_state(n=8, seed=0):
    state = {}
    hm.gaussian_layer(state, "gaussians", n, np.random.default_rng(seed), degree=1)
    return state


def _scene(tmp_path, members, name="s.usdz", **kw):
    path = tmp_path / name
    hm.usdz(path, members, **kw)
    return path


def _load(path, **opts):
    return nurec_jax.load_scene(path, nurec_jax.LoadOptions(**opts))


def test_not_a_zip(tmp_path):
    path = tmp_path / "x.usdz"
    path.write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(SceneFormatError, match=r"x\.usdz: not a zip archive"):
        _load(path)


def test_truncated_zip(tmp_path):
    path = _scene(tmp_path, [("volume.usda", hm.volume_usda()), ("volume.nurec", hm.payload(_good_state(), {}))])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SceneFormatError, match="not a zip archive, or truncated"):
        _load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "nope.usdz")


def test_no_nurec_volume(tmp_path):
    usda = b'#usda 1.0\n(\n    defaultPrim = "World"\n)\ndef Xform "World"\n{\n}\n'
    path = _scene(tmp_path, [("default.usda", usda), ("metadata.yaml", b"scene_id: a\n")])
    with pytest.raises(SceneFormatError, match="no NuRec volume"):
        _load(path)


def test_missing_payload(tmp_path):
    path = _scene(tmp_path, [("volume.usda", hm.volume_usda(payload="volume.nurec"))])
    with pytest.raises(SceneFormatError, match=r"/World/volume points at payload './volume.nurec'.*missing"):
        _load(path)


def test_shapes_disagree(tmp_path):
    state = _good_state(8)
    hm.tensor(state, ".gaussians_nodes.gaussians.scales", np.zeros((7, 3)))
    path = _scene(tmp_path, [("volume.nurec", hm.payload(state, {}))])
    with pytest.raises(SceneFormatError, match=r"layer 'gaussians': scales has shape \[7, 3\], expected \[8, 3\]"):
        _load(path)


def test_bytes_disagree_with_shape(tmp_path):
    state = _good_state(8)
    state[".gaussians_nodes.gaussians.positions.shape"] = [9, 3]
    path = _scene(tmp_path, [("volume.nurec", hm.payload(state, {}))])
    with pytest.raises(SceneFormatError, match=r"volume\.nurec: '.gaussians_nodes.gaussians.positions' holds 48 bytes"):
        _load(path)


def test_missing_tensor(tmp_path):
    state = _good_state(8)
    del state[".gaussians_nodes.gaussians.rotations"]
    path = _scene(tmp_path, [("volume.nurec", hm.payload(state, {}))])
    with pytest.raises(SceneFormatError, match=r"layer 'gaussians': missing tensors \['rotations'\]"):
        _load(path)


def test_unsupported_activation(tmp_path):
    config = {"layers": {"gaussians": hm.layer_config(o0=False, degree=1, density_activation="relu")}}
    path = _scene(tmp_path, [("volume.nurec", hm.payload(_good_state(), config))])
    with pytest.raises(UnsupportedSceneError, match=r"layer 'gaussians': unsupported density_activation 'relu'"):
        _load(path)


@pytest.mark.parametrize("name", ["/etc/evil.nurec", "../evil.nurec", "a/../../evil.nurec"])
def test_member_paths_outside_archive(tmp_path, name):
    path = tmp_path / "evil.usdz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo(name), hm.payload(_good_state(), {}))
    with pytest.raises(SceneFormatError, match="absolute path|'\\.\\.' path component"):
        _load(path)
    assert not os.path.exists("/etc/evil.nurec") and not (tmp_path.parent / "evil.nurec").exists()


def test_gzip_bomb_is_refused(tmp_path):
    state = _good_state()
    state["padding"] = b"\0" * (8 << 20)  # compresses to a few KB, inflates to 8 MiB
    path = _scene(tmp_path, [("volume.nurec", hm.payload(state, {}, level=9))])
    assert path.stat().st_size < 100_000
    with pytest.raises(SceneFormatError, match=r"volume\.nurec: decompressed payload exceeds the limit of 1048576"):
        _load(path, max_payload_bytes=1 << 20)
    # By default its 1000:1 inflation is refused as a bomb; with the ratio check off and the size limit
    # generous, the same file loads.
    with pytest.raises(SceneFormatError, match=r"volume\.nurec: gzip stream inflates more than 200:1"):
        _load(path)
    assert _load(path, max_inflation_ratio=None).gaussians.static.count == 8


def test_zip_bomb_member_is_refused(tmp_path):
    path = _scene(
        tmp_path,
        [("volume.nurec", hm.payload(_good_state(), {})), ("junk.bin", b"\0" * (4 << 20))],
        compression=zipfile.ZIP_DEFLATED,
    )
    with pytest.raises(SceneFormatError, match=r"junk\.bin.*exceeds the limit"):
        nurec_jax.scene.Archive(path, 1 << 20).read("junk.bin")


def test_truncated_gzip_payload(tmp_path):
    data = hm.payload(_good_state(), {})
    path = _scene(tmp_path, [("volume.nurec", data[: len(data) - 40])])
    with pytest.raises(SceneFormatError, match=r"volume\.nurec: gzip stream is truncated|not a valid gzip"):
        _load(path)


def test_payload_not_msgpack(tmp_path):
    path = _scene(tmp_path, [("volume.nurec", gzip.compress(b"\xc1\xc1 definitely not msgpack"))])
    with pytest.raises(SceneFormatError, match=r"volume\.nurec: payload is not valid msgpack"):
        _load(path)


def test_payload_without_nre_data(tmp_path):
    path = _scene(tmp_path, [("volume.nurec", gzip.compress(msgpack.packb({"other": 1})))])
    with pytest.raises(SceneFormatError, match="no 'nre_data' map"):
        _load(path)


def test_bad_side_files(tmp_path):
    members = [("volume.nurec", hm.payload(_good_state(), {})), ("rig_trajectories.json", b"{not json")]
    with pytest.raises(SceneFormatError, match=r"rig_trajectories\.json: invalid JSON"):
        nurec_jax.read_scene_metadata(_scene(tmp_path, members))
    bad = {"rig_trajectories": [{"T_rig_world_timestamps_us": [1, 2], "T_rig_worlds": [np.eye(4).tolist()]}]}
    members[1] = ("rig_trajectories.json", hm.jbytes(bad))
    with pytest.raises(SceneFormatError, match=r"rig_trajectories\[0\]: T_rig_world_timestamps_us \(2\)"):
        nurec_jax.read_scene_metadata(_scene(tmp_path, members, name="b.usdz"))
    tracks = {
        "seq": {
            "tracks_data": {
                "tracks_id": ["1"],
                "tracks_label_class": ["car"],
                "tracks_flags": ["NONE"],
                "tracks_timestamps_us": [[1, 2]],
                "tracks_poses": [[[0] * 7, [0] * 7]],
            },
            "cuboidtracks_data": {"cuboids_dims": [[1, 1, 1]]},
        }
    }
    members[1] = ("sequence_tracks.json", hm.jbytes(tracks))
    with pytest.raises(
        SceneFormatError, match=r"sequence_tracks\.json: \['seq'\] track '1': tracks_poses has a zero quaternion"
    ):
        nurec_jax.read_scene_metadata(_scene(tmp_path, members, name="c.usdz"))


def test_metadata_is_read_without_decoding_gaussians(tmp_path):
    """A broken payload does not stop metadata queries (the server answers those from metadata)."""
    members = [("volume.nurec", b"garbage"), ("metadata.yaml", b"scene_id: meta-only\n")]
    path = _scene(tmp_path, members)
    assert nurec_jax.read_scene_metadata(path).scene_id == "meta-only"
    with pytest.raises(SceneFormatError):
        _load(path)


def test_rigid_ids_out_of_range(tmp_path):
    state = {}
    hm.gaussian_layer(state, "dynamic_rigids", 4, np.random.default_rng(1), degree=0, cuboid_ids=np.array([0, 1, 2, 5]))
    state["._extra_state"] = {"obj_track_ids": {"dynamic_rigids": ["1", "2", "3"]}}
    path = _scene(tmp_path, [("volume.nurec", hm.payload(state, {}))])
    with pytest.raises(SceneFormatError, match=r"gaussian_cuboid_ids range \[0, 5\] outside its 3 tracks"):
        _load(path)


def test_bad_camera_calibration_names_the_key(tmp_path):
    cal = {
        "logical_sensor_name": "cam",
        "T_sensor_rig": np.eye(4).tolist(),
        "camera_model": {
            "type": "opencv-fisheye",
            "parameters": {
                "resolution": [64, 48],
                "principal_point": [32, 24],
                "focal_length": [20, 20],
                "max_angle": 4.0,
            },
        },
    }
    members = [
        ("volume.nurec", hm.payload(_good_state(), {})),
        ("rig_trajectories.json", hm.jbytes({"camera_calibrations": {"cam@x": cal}})),
    ]
    with pytest.raises(
        SceneFormatError,
        match=r"camera_calibrations\['cam@x'\].camera_model.parameters.max_angle: "
        r"4.0 not in \(0, pi\]",
    ):
        nurec_jax.read_scene_metadata(_scene(tmp_path, members))


def test_non_cubemap_sky_and_unknown_colour_models_load_with_clear_warnings(tmp_path):
    state = _good_state()
    hm.tensor(state, ".background.textures", np.full((1, 8, 16, 3), 0.5))  # equirectangular [1, H, W, 3]
    config = {
        "background": {"name": "sky-env-map", "envmap_type": "equirectangular"},
        "appearance_embedding": {"name": "per-frame-appearance"},
        "post_processing": {"a": {"name": "tonemap-post-processing"}},
    }
    path = _scene(tmp_path, [("volume.nurec", hm.payload(state, config))])
    host = nurec_jax.load_host_scene(path)
    assert host.sky_cubemap is None
    text = " | ".join(host.report.warnings)
    assert "sky: equirectangular environment map of shape [1, 8, 16, 3] is not supported" in text
    assert "appearance embedding 'per-frame-appearance' is not applied" in text
    assert "post-processing a: 'tonemap-post-processing' is not implemented" in text


def test_deformable_layers_never_fail_the_scene(tmp_path):
    rng = np.random.default_rng(1)
    state = _good_state()
    hm.gaussian_layer(state, "dynamic_deformables", 6, rng, degree=1, cuboid_ids=np.zeros(6, np.int32))
    # No obj_track_ids entry for it: skipped with a warning, the rest loads.
    path = _scene(tmp_path, [("volume.nurec", hm.payload(state, {}))])
    host = nurec_jax.load_host_scene(path)
    assert host.report.skipped_layers == ("dynamic_deformables",)
    assert any("obj_track_ids has no track list" in w for w in host.report.warnings)
    # With its track list it renders rigidly attached to its track, and says so.
    state["._extra_state"] = {"obj_track_ids": {"dynamic_deformables": ["4@seq"]}}
    path = _scene(tmp_path, [("volume.nurec", hm.payload(state, {}))], name="t.usdz")
    host = nurec_jax.load_host_scene(path)
    (layer,) = host.rigid_layers
    assert layer.name == "dynamic_deformables" and layer.track_ids == ("4",)
    assert "rigidly attached" in host.report.layers[-1].approximation
