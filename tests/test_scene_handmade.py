"""Loads NuRec scenes built by hand from the spec (tests/handmade.py), independent of the generator."""

import math

import handmade as hm
import numpy as np
import pytest

import nurec_jax
from nurec_jax import sh

SEQ = "clipgt-x"
T0 = 1_689_697_803_493_732


def _rot_z(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])


def _world_to_nre(rot_deg=0.0):
    m = np.eye(4)
    m[:3, :3] = _rot_z(rot_deg)
    m[:3, 3] = [-38.0, 2.5, -0.75]
    return m


def _rig(world_to_nre):
    ts = [T0, T0 + 100_000, T0 + 200_000]
    poses = []
    for i in range(3):
        p = np.eye(4)
        p[:3, :3] = _rot_z(2.0 * i)
        p[:3, 3] = [i * 1.0, 0.1 * i, 0.0]
        poses.append(p.tolist())
    cam_t = np.eye(4)
    cam_t[:3, :3] = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    cam_t[:3, 3] = [1.7, 0.0, 1.4]
    key = f"camera_front_wide_120fov@{SEQ}"
    return {
        "T_world_base": np.eye(4).tolist(),
        "world_to_nre": {"matrix": world_to_nre.tolist()},
        "camera_calibrations": {
            key: {
                "logical_sensor_name": "camera_front_wide_120fov",
                "sequence_id": SEQ,
                "unique_sensor_idx": 0,
                "T_sensor_rig": cam_t.tolist(),
                "camera_model": {
                    "type": "ftheta",
                    "parameters": {
                        "resolution": [1920, 1080],
                        "shutter_type": "ROLLING_TOP_TO_BOTTOM",
                        "principal_point": [960.5, 540.25],
                        "reference_poly": "PIXELDIST_TO_ANGLE",
                        "pixeldist_to_angle_poly": [0.0, 1.1e-3, 1e-8, -2e-11, 0.0, 0.0],
                        "angle_to_pixeldist_poly": [0.0, 909.0, -5.0, 1.0, 0.0, 0.0],
                        "max_angle": 1.1,
                        "linear_cde": [1.001, 0.002, -0.001],
                    },
                },
            }
        },
        "rig_trajectories": [
            {
                "sequence_id": SEQ,
                "T_rig_world_timestamps_us": ts,
                "T_rig_worlds": poses,
                "cameras_frame_timestamps_us": {key: [[ts[0], ts[0] + 30_000], [ts[1], ts[1] + 30_000]]},
                "rig_bbox": {"centroid": [1.3, 0, 0.8], "dim": [4.8, 1.9, 1.6], "rot": [0, 0, 0]},
            }
        ],
    }


def _tracks():
    def track(x0):
        ts = [T0, T0 + 100_000, T0 + 200_000]
        return ts, [[x0 + i, 1.0, 0.7, 0.0, 0.0, math.sin(0.1 * i), math.cos(0.1 * i)] for i in range(3)]

    ids = ["3", "7", "11"]
    data = [track(5.0), track(10.0), track(20.0)]
    return {
        SEQ: {
            "tracks_data": {
                "tracks_id": ids,
                "tracks_label_class": ["automobile", "automobile", "person"],
                "tracks_flags": ["DYNAMIC|CONTROLLABLE", "NONE", "CONTROLLABLE"],
                "tracks_timestamps_us": [d[0] for d in data],
                "tracks_poses": [d[1] for d in data],
            },
            "cuboidtracks_data": {"cuboids_dims": [[4.5, 1.9, 1.5], [4.0, 1.8, 1.4], [0.6, 0.6, 1.8]]},
        }
    }


def build_driving_scene(tmp_path, *, rot_deg=0.0, with_usd=True, pad64=False, seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    bg = hm.gaussian_layer(state, "background", 40, rng, fourier=5)
    # Two Gaussians with non-finite values must be dropped.
    pos = np.asarray(bg["positions"], np.float64).copy()
    pos[3, 1] = np.nan
    pos[17, 0] = np.inf
    hm.tensor(state, ".gaussians_nodes.background.positions", pos)
    road = hm.gaussian_layer(state, "road", 30, rng, fourier=1)
    rig = hm.gaussian_layer(state, "dynamic_rigids", 6, rng, fourier=3, cuboid_ids=np.array([0, 0, 1, 1, 2, 2]))
    state["._extra_state"] = {"obj_track_ids": {"dynamic_rigids": [f"7@{SEQ}", f"3@{SEQ}", f"99@{SEQ}"]}}
    hm.tensor(state, ".background.textures", rng.uniform(0, 1, (1, 6, 4, 4, 3)))
    config = {
        "layers": {
            "background": hm.layer_config(fourier_features_dim=5),
            "road": hm.layer_config(fourier_features_dim=1),
            "dynamic_rigids": hm.layer_config(fourier_features_dim=3),
        },
        "background": {"name": "sky-env-map", "width": 4, "height": 4},
    }
    w2n = _world_to_nre(rot_deg)
    members = []
    if with_usd:
        members += [("default.usda", hm.default_usda()), ("volume.usda", hm.volume_usda())]
    members += [
        ("volume.nurec", hm.payload(state, config)),
        ("metadata.yaml", f"scene_id: {SEQ}\ntime_range:\n  start: {T0}\n  end: {T0 + 200000}\n".encode()),
        ("rig_trajectories.json", hm.jbytes(_rig(w2n))),
        ("sequence_tracks.json", hm.jbytes(_tracks())),
    ]
    path = tmp_path / f"scene_{rot_deg}_{with_usd}_{pad64}.usdz"
    hm.usdz(path, members, pad64=pad64)
    return path, dict(background=bg, road=road, rigid=rig, state=state, w2n=w2n, bg_positions=pos)


def _f16(a):
    return np.asarray(a, np.float16).astype(np.float64)


def _covariances(quats, scales):
    from nurec_jax import geometry

    r = geometry.quat_wxyz_to_matrix(np.asarray(quats, np.float64))
    s = np.asarray(scales, np.float64)
    return r @ (s[:, :, None] ** 2 * np.swapaxes(r, 1, 2))


@pytest.mark.parametrize("rot_deg", [0.0, 30.0])
def test_static_layers_in_world_frame(tmp_path, rot_deg):
    path, raw = build_driving_scene(tmp_path, rot_deg=rot_deg)
    scene = nurec_jax.load_scene(path)
    road = scene.gaussians.layer("road")
    nre_to_world = np.linalg.inv(raw["w2n"])
    want = _f16(raw["road"]["positions"]) @ nre_to_world[:3, :3].T + nre_to_world[:3, 3]
    np.testing.assert_allclose(np.asarray(road.means), want, atol=2e-4)
    # Covariances map with the rotation: Σ_world = R Σ_nre Rᵀ.
    cov_nre = _covariances(_f16(raw["road"]["rotations"]), np.exp(_f16(raw["road"]["scales"])))
    r = nre_to_world[:3, :3]
    np.testing.assert_allclose(_covariances(road.quats, road.scales), r @ cov_nre @ r.T, atol=1e-6)
    opac = 1 / (1 + np.exp(-_f16(raw["road"]["densities"]).ravel()))
    np.testing.assert_allclose(np.asarray(road.opacities), opac, atol=1e-6)


@pytest.mark.parametrize("rot_deg", [0.0, 30.0])
def test_colours_follow_radiance_o0_and_frame(tmp_path, rot_deg):
    """O0 colour (albedo is radiance) seen from world directions equals the payload-frame colour."""
    path, raw = build_driving_scene(tmp_path, rot_deg=rot_deg)
    scene = nurec_jax.load_scene(path)
    road = scene.gaussians.layer("road")
    rng = np.random.default_rng(5)
    d_world = rng.normal(size=(30, 3))
    d_world /= np.linalg.norm(d_world, axis=1, keepdims=True)
    got = sh.sh_to_rgb(np.asarray(road.sh, np.float64), d_world, 3)
    # Independent: the payload's own frame, O0 formula rgb = max(0, albedo + sum_{l>=1} Y(d) c).
    d_nre = d_world @ raw["w2n"][:3, :3].T
    spec = _f16(hm_spec(raw["state"], "road")).reshape(30, 15, 3)
    alb = _f16(raw["road"]["albedo"])[:, 0, :]
    y = sh.sh_basis(d_nre, 3)[:, 1:]
    want = np.maximum(alb + np.einsum("nk,nkc->nc", y, spec), 0.0)
    np.testing.assert_allclose(got, want, atol=2e-5)


def hm_spec(state, layer):
    key = f".gaussians_nodes.{layer}.features_specular"
    return np.frombuffer(state[key], "<f2").reshape(state[key + ".shape"])


def test_nonfinite_gaussians_dropped_and_reported(tmp_path):
    path, _ = build_driving_scene(tmp_path)
    scene = nurec_jax.load_scene(path)
    assert scene.report.dropped_gaussians == 2
    bg = [l for l in scene.report.layers if l.name == "background"][0]
    assert (bg.count, bg.dropped) == (38, 2)
    assert np.all(np.isfinite(np.asarray(scene.gaussians.static.means)))


def test_rigid_layer_tracks(tmp_path):
    path, raw = build_driving_scene(tmp_path)
    scene = nurec_jax.load_scene(path)
    g = scene.gaussians
    # The layer's own order, '@' suffixes stripped; '99' has Gaussians but no JSON track (legal).
    assert g.track_ids == ("7", "3", "99")
    np.testing.assert_allclose(np.asarray(g.actor("7").means), _f16(raw["rigid"]["positions"][:2]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g.actor("3").means), _f16(raw["rigid"]["positions"][2:4]), atol=1e-6)
    meta = scene.metadata
    assert set(meta.tracks) == {"3", "7", "11"}  # '11' has no Gaussians (legal)
    assert meta.tracks["7"].is_controllable is False and meta.tracks["3"].is_controllable
    assert any("99" in w for w in scene.report.warnings)
    # A rigid Gaussian at local (0, 0, 0) lands at the track position at time t (lerp between samples).
    pose = meta.tracks["3"].pose_at(T0 + 50_000)
    np.testing.assert_allclose(pose[:3, 3], [5.5, 1.0, 0.7], atol=1e-9)
    assert not meta.tracks["3"].is_present(T0 - 1) and meta.tracks["3"].is_present(T0 + 1)


def test_metadata(tmp_path):
    path, raw = build_driving_scene(tmp_path)
    meta = nurec_jax.read_scene_metadata(path)
    assert meta.scene_id == SEQ
    cam = meta.cameras["camera_front_wide_120fov"]
    assert cam.intrinsics.shutter_type == nurec_jax.ShutterType.ROLLING_TOP_TO_BOTTOM
    assert cam.intrinsics.principal_point == (960.5, 540.25)
    assert cam.intrinsics.linear_cde == (1.001, 0.002, -0.001)
    assert cam.frame_timestamps_us.shape == (2, 2)
    assert meta.trajectory.timestamps_us[0] == T0
    np.testing.assert_allclose(meta.trajectory.pose_at(T0 + 100_000)[:3, 3], [1.0, 0.1, 0.0])
    np.testing.assert_allclose(meta.world_to_nre, raw["w2n"])
    assert meta.time_range_us == (T0, T0 + 200_000)


@pytest.mark.parametrize("variant", ["no_usd", "pad64"])
def test_variants_load_the_same(tmp_path, variant):
    ref_path, _ = build_driving_scene(tmp_path)
    path, _ = build_driving_scene(tmp_path, with_usd=variant != "no_usd", pad64=variant == "pad64")
    a = nurec_jax.load_scene(ref_path).gaussians
    b = nurec_jax.load_scene(path).gaussians
    np.testing.assert_array_equal(np.asarray(a.static.means), np.asarray(b.static.means))
    np.testing.assert_array_equal(np.asarray(a.dynamic.sh), np.asarray(b.dynamic.sh))
    if variant == "pad64":
        import zipfile

        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0


def test_sky_cubemap(tmp_path):
    path, raw = build_driving_scene(tmp_path, rot_deg=30.0)
    sky = nurec_jax.load_scene(path).gaussians.sky
    tex = np.frombuffer(raw["state"][".background.textures"], "<f2").reshape(6, 4, 4, 3)
    np.testing.assert_allclose(np.asarray(sky.cubemap), tex.astype(np.float32))
    np.testing.assert_allclose(np.asarray(sky.rotation_world_to_sky), _rot_z(30.0), atol=1e-6)


def test_3dgrut_flavour_with_reflection_transform(tmp_path):
    """A 3DGRUT export: gauss.usda, <stem>.nurec, one 'gaussians' layer, albedo [N,3], no O0,
    and a Volume xformOp (here an axis flip, a reflection)."""
    rng = np.random.default_rng(3)
    state = {}
    raw = hm.gaussian_layer(state, "gaussians", 25, rng, degree=1)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[3, :3] = [1.0, 2.0, 3.0]  # USD row-vector translation
    members = [
        ("gauss.usda", hm.volume_usda("gauss", "mystem.nurec", flip)),
        ("mystem.nurec", hm.payload(state, {"layers": {"gaussians": hm.layer_config(o0=False, degree=1)}})),
    ]
    path = tmp_path / "mystem.usdz"
    hm.usdz(path, members, pad64=True)
    scene = nurec_jax.load_scene(path)
    assert scene.scene_id == "mystem"
    assert scene.metadata.trajectory is None and not scene.metadata.cameras
    g = scene.gaussians.static
    want = _f16(raw["positions"]) * [-1, 1, 1] + [1.0, 2.0, 3.0]
    np.testing.assert_allclose(np.asarray(g.means), want, atol=1e-5)
    a = np.diag([-1.0, 1, 1])
    cov = _covariances(_f16(raw["rotations"]), np.exp(_f16(raw["scales"])))
    np.testing.assert_allclose(_covariances(g.quats, g.scales), a @ cov @ a.T, atol=1e-6)
    # 3DGS colour convention, direction reflected into the payload frame.
    d = np.array([[0.3, -0.5, 0.81]])
    d /= np.linalg.norm(d)
    spec = np.frombuffer(state[".gaussians_nodes.gaussians.features_specular"], "<f2").astype(np.float64)
    coeffs = np.concatenate([_f16(raw["albedo"])[:, None, :], spec.reshape(25, 3, 3)], 1)
    want_rgb = sh.sh_to_rgb(coeffs, d @ a, 1)
    np.testing.assert_allclose(sh.sh_to_rgb(np.asarray(g.sh, np.float64), d, 1), want_rgb, atol=2e-5)
    assert scene.gaussians.sky.cubemap is None


def test_payload_without_usd_layers_and_stem_name(tmp_path):
    rng = np.random.default_rng(4)
    state = {}
    hm.gaussian_layer(state, "gaussians", 10, rng, degree=0)
    path = tmp_path / "plain.usdz"
    hm.usdz(path, [("plain.nurec", hm.payload(state, {}))])
    scene = nurec_jax.load_scene(path)
    assert scene.gaussians.static.count == 10 and scene.gaussians.static.sh_degree == 0
    assert scene.report.layers[0].colour_convention == "3dgs"


def test_volume_found_by_traversal_not_path(tmp_path):
    """The Volume sits at an unusual path, and the only USD layer does not start with 'default'."""
    rng = np.random.default_rng(6)
    state = {}
    hm.gaussian_layer(state, "gaussians", 7, rng, degree=0)
    text = hm.volume_usda("somewhere_else", "data/blob.nurec").decode()
    path = tmp_path / "odd.usdz"
    hm.usdz(path, [("odd.usda", text.encode()), ("data/blob.nurec", hm.payload(state, {}))])
    scene = nurec_jax.load_scene(path)
    assert scene.report.sources == ("/World/somewhere_else -> data/blob.nurec",)
    assert scene.gaussians.static.count == 7
