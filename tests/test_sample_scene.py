"""The bundled sample scene: reproducible from its generator, faithful, and loaded back exactly."""

import gzip
import json
import re
import zipfile

import msgpack
import numpy as np
import pytest
import yaml

import nurec_jax
from tools import make_sample_scene as gen


@pytest.fixture(scope="module")
def sample():
    return nurec_jax.load_scene(nurec_jax.sample_scene_path())


@pytest.fixture(scope="module")
def raw_state():
    """The payload as written, decoded with plain msgpack + numpy (not the loader)."""
    with zipfile.ZipFile(nurec_jax.sample_scene_path()) as z:
        doc = msgpack.unpackb(gzip.decompress(z.read("volume.nurec")), raw=False, strict_map_key=False)
    return doc["nre_data"]


def _t(state, key, dtype="<f2"):
    return np.frombuffer(state[key], dtype).reshape(state[key + ".shape"]).astype(np.float64)


# Stated tolerances for the regenerated file. The generator rounds what it fits, so on most machines the
# bytes are identical; what can still move between CPUs is the last bit of a vectorised numpy
# transcendental before a value is stored: one float16 step (2^-10 relative) in the payload and the
# asset PLYs, 1e-9 relative in JSON / YAML / USDA numbers.
_F16_RTOL, _F32_RTOL, _TEXT_RTOL = 2.0**-10, 1e-6, 1e-9
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _close_numbers(a, b, rtol, atol, where):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol, err_msg=where
    )


def _compare_tree(a, b, where):
    """Decoded JSON / YAML / msgpack trees: same structure, same strings, numbers within tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys differ"
        for k in a:
            _compare_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _compare_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        _close_numbers(a, b, _TEXT_RTOL, 1e-12, where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _compare_payload(a, b):
    sa = msgpack.unpackb(gzip.decompress(a), raw=False, strict_map_key=False)
    sb = msgpack.unpackb(gzip.decompress(b), raw=False, strict_map_key=False)

    def walk(x, y, where):
        if isinstance(x, bytes):
            assert isinstance(y, bytes) and len(x) == len(y), f"{where}: buffer sizes differ"
            if x != y:  # a float buffer may move by one step of its precision; nothing else may
                dtype = {2: "<f2", 4: "<f4"}.get(len(x) // max(1, np.prod(shapes.get(where, [len(x)]))))
                assert dtype is not None, f"{where}: bytes differ"
                _close_numbers(
                    np.frombuffer(x, dtype),
                    np.frombuffer(y, dtype),
                    _F16_RTOL if dtype == "<f2" else _F32_RTOL,
                    1e-6,
                    where,
                )
        elif isinstance(x, dict):
            assert isinstance(y, dict) and list(x) == list(y), f"{where}: keys differ"
            for k in x:
                walk(x[k], y[k], k if isinstance(k, str) and k.startswith(".") else f"{where}.{k}")
        else:
            _compare_tree(x, y, where)

    shapes = {
        k[: -len(".shape")]: v
        for k, v in sa["nre_data"]["state_dict"].items()
        if isinstance(k, str) and k.endswith(".shape")
    }
    walk(sa, sb, "volume.nurec")


def _compare_member(name, a, b):
    if a == b:
        return
    if name.endswith(".nurec"):
        _compare_payload(a, b)
    elif name.endswith(".json"):
        _compare_tree(json.loads(a), json.loads(b), name)
    elif name.endswith(".yaml"):
        _compare_tree(yaml.safe_load(a), yaml.safe_load(b), name)
    elif name.endswith(".usda"):
        ta, tb = a.decode(), b.decode()
        assert _NUMBER.split(ta) == _NUMBER.split(tb), f"{name}: text other than numbers differs"
        _close_numbers(
            [float(v) for v in _NUMBER.findall(ta)], [float(v) for v in _NUMBER.findall(tb)], _TEXT_RTOL, 1e-12, name
        )
    elif name.endswith(".ply"):
        end = a.index(b"end_header\n") + len(b"end_header\n")
        assert a[:end] == b[:end] and len(a) == len(b), f"{name}: header or size differs"
        _close_numbers(np.frombuffer(a[end:], "<f4"), np.frombuffer(b[end:], "<f4"), _F32_RTOL, 1e-6, name)
    else:
        raise AssertionError(f"{name} differs")


def test_shipped_file_is_what_the_generator_makes(tmp_path):
    """The shipped scene is the generator's output: same members in the same order, same content within
    the stated tolerances (bytes where they are stable). A failure means the generator changed without
    the file being regenerated (`make sample-scene`), not that this machine differs."""
    out = tmp_path / "regen.usdz"
    gen.main(["--output", str(out)])
    with zipfile.ZipFile(nurec_jax.sample_scene_path()) as shipped, zipfile.ZipFile(out) as regen:
        names = [i.filename for i in shipped.infolist()]
        assert [i.filename for i in regen.infolist()] == names
        for name in names:
            _compare_member(name, shipped.read(name), regen.read(name))


def test_scene_comparison_catches_a_real_change():
    """The tolerant comparison is not blind: a moved float16 value, a changed string, an extra key fail."""
    with zipfile.ZipFile(nurec_jax.sample_scene_path()) as z:
        payload, rig = z.read("volume.nurec"), z.read("rig_trajectories.json")
    doc = msgpack.unpackb(gzip.decompress(payload), raw=False, strict_map_key=False)
    key = ".gaussians_nodes.road.positions"
    arr = np.frombuffer(doc["nre_data"]["state_dict"][key], "<f2").copy()
    arr[7] += np.float16(0.5)
    doc["nre_data"]["state_dict"][key] = arr.tobytes()
    with pytest.raises(AssertionError, match="positions"):
        _compare_member("volume.nurec", payload, gzip.compress(msgpack.packb(doc)))
    tree = json.loads(rig)
    tree["world_to_nre"]["matrix"][0][3] += 1e-6
    with pytest.raises(AssertionError, match="world_to_nre"):
        _compare_member("rig_trajectories.json", rig, json.dumps(tree).encode())
    tree = json.loads(rig)
    tree["extra"] = 1
    with pytest.raises(AssertionError, match="keys differ"):
        _compare_member("rig_trajectories.json", rig, json.dumps(tree).encode())


def test_layout_follows_the_spec():
    with zipfile.ZipFile(nurec_jax.sample_scene_path()) as z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        assert names[:6] == [
            "default.usda",
            "volume.usda",
            "volume.nurec",
            "metadata.yaml",
            "rig_trajectories.json",
            "sequence_tracks.json",
        ]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        rig = json.loads(z.read("rig_trajectories.json"))
    assert rig["world_to_nre"]["matrix"][0][3] != 0.0
    size = len(open(nurec_jax.sample_scene_path(), "rb").read())
    assert 1 << 20 < size < 8 << 20, size


def test_counts_and_content(sample):
    total = sum(l.count for l in sample.report.layers)
    assert 50_000 <= total <= 200_000
    assert [l.name for l in sample.report.layers] == ["background", "road", "dynamic_rigids"]
    meta = sample.metadata
    assert meta.scene_id == gen.SEQ
    front = meta.cameras["camera_front_wide_120fov"].intrinsics
    assert front.model == "ftheta" and front.shutter_type.name == "ROLLING_TOP_TO_BOTTOM"
    models = sorted(c.intrinsics.model for c in meta.cameras.values())
    assert models.count("ftheta") >= 2 and "opencv-pinhole" in models
    assert "lidar_top_360fov" in meta.lidars
    ts = meta.trajectory.timestamps_us
    assert (ts[-1] - ts[0]) / 1e6 >= 10.0
    dist = np.linalg.norm(meta.trajectory.T_rig_world[-1, :3, 3] - meta.trajectory.T_rig_world[0, :3, 3])
    speed = dist / ((ts[-1] - ts[0]) / 1e6)
    assert 5.0 < speed < 17.0  # urban speed, m/s
    moving = [t for t in meta.tracks.values() if "DYNAMIC" in t.flags]
    parked = [t for t in meta.tracks.values() if "DYNAMIC" not in t.flags and t.label == "automobile"]
    assert len(moving) >= 2 and len(parked) >= 2
    assert sample.gaussians.sky.cubemap.shape == (6, 64, 64, 3)


def test_round_trip_values(sample, raw_state):
    """Generator -> file -> loader gives back the written values (float16 precision)."""
    state = raw_state["state_dict"]
    w2n = np.asarray(
        json.loads(zipfile.ZipFile(nurec_jax.sample_scene_path()).read("rig_trajectories.json"))["world_to_nre"][
            "matrix"
        ]
    )
    for layer in ("background", "road"):
        got = sample.gaussians.layer(layer)
        pre = f".gaussians_nodes.{layer}."
        pos = _t(state, pre + "positions")
        np.testing.assert_allclose(np.asarray(got.means), pos - w2n[:3, 3], atol=1e-4, err_msg=layer)
        np.testing.assert_allclose(np.asarray(got.scales), np.exp(_t(state, pre + "scales")), rtol=1e-6)
        q = _t(state, pre + "rotations")
        np.testing.assert_allclose(np.asarray(got.quats), q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-6)
        dens = _t(state, pre + "densities").ravel()
        np.testing.assert_allclose(np.asarray(got.opacities), 1 / (1 + np.exp(-dens)), atol=1e-6)
        assert (dens < 0).any() and (dens > 0).any()
        assert np.all((np.asarray(got.opacities) > 0) & (np.asarray(got.opacities) < 1))
        # O0: the DC term is the radiance; in the 3DGS convention 0.5 + C0 * dc recovers it.
        alb = _t(state, pre + "features_albedo")[:, 0, :]
        np.testing.assert_allclose(0.5 + nurec_jax.sh.C0 * np.asarray(got.sh[:, 0, :]), alb, atol=1e-5)
        spec = _t(state, pre + "features_specular").reshape(-1, 15, 3)
        np.testing.assert_allclose(np.asarray(got.sh[:, 1:, :]), spec, atol=1e-7)
    # Specular: distinct values per coefficient and channel, so a layout bug would show.
    assert len(np.unique(np.asarray(sample.gaussians.static.sh[0, 1:, :]))) == 45
    raw_q = _t(state, ".gaussians_nodes.road.rotations")
    assert np.abs(np.linalg.norm(raw_q, axis=1) - 1).max() > 0.1  # stored unnormalised


def test_rigid_actors_follow_their_tracks(sample, raw_state):
    state = raw_state["state_dict"]
    order = [s.split("@")[0] for s in state["._extra_state"]["obj_track_ids"]["dynamic_rigids"]]
    assert order != sorted(order) and all("@" in s for s in state["._extra_state"]["obj_track_ids"]["dynamic_rigids"])
    assert sample.gaussians.track_ids == tuple(order)
    ids = np.frombuffer(state[".gaussians_nodes.dynamic_rigids.gaussian_cuboid_ids"], "<i4")
    pos = _t(state, ".gaussians_nodes.dynamic_rigids.positions")
    meta = sample.metadata
    t = meta.trajectory.timestamps_us[20]
    for c, tid in enumerate(order):
        local = np.asarray(sample.gaussians.actor(tid).means)
        np.testing.assert_allclose(local, pos[ids == c], atol=1e-6)
        # Cuboid-local: the box is centred on its origin and fits its dims.
        dims = meta.tracks[tid].dims
        assert np.all(np.abs(local) <= dims / 2 + 0.2)
        world = local @ meta.tracks[tid].pose_at(t)[:3, :3].T + meta.tracks[tid].pose_at(t)[:3, 3]
        assert world[:, 2].min() > -0.1 and world[:, 2].max() < dims[2] + 0.1  # on the road, not in it
    assert "11" in meta.tracks and "11" not in sample.gaussians.track_ids  # a track without Gaussians


def test_ego_drives_on_the_road(sample):
    road = np.asarray(sample.gaussians.layer("road").means)
    for pose in sample.metadata.trajectory.T_rig_world[::10]:
        near = np.linalg.norm(road[:, :2] - pose[:2, 3], axis=1) < 0.5
        assert near.sum() > 3
        assert abs(np.median(road[near, 2]) - pose[2, 3]) < 0.05


def test_every_camera_sees_the_street(sample):
    """Cheap visibility oracle: many Gaussians lie in front of each camera and inside its field of view."""
    meta = sample.metadata
    means = np.asarray(sample.gaussians.static.means, np.float64)
    t = meta.trajectory.timestamps_us[40]
    for cam in meta.cameras.values():
        T = meta.trajectory.pose_at(t) @ cam.T_sensor_rig
        p = (means - T[:3, 3]) @ T[:3, :3]
        ang = np.arctan2(np.linalg.norm(p[:, :2], axis=1), p[:, 2])
        visible = (ang < 0.5) & (np.linalg.norm(p, axis=1) < 80)
        assert visible.sum() > 1000, cam.logical_id
