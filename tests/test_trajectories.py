"""Several rig trajectories in one scene: per-trajectory calibrations, frames and recorded frame poses,
their gRPC listing and selection (trajectory_idx), merged sequence tracks and the data_info.json scene id."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import grpc
import handmade as hm
import numpy as np
import pytest
from PIL import Image

import nurec_jax
from nurec_jax import lidar_models, renderer
from nurec_jax import scene as scene_lib
from nurec_jax._proto import sensorsim_pb2, sensorsim_pb2_grpc
from nurec_jax.errors import SceneFormatError
from nurec_jax.metadata import parse_rig_document, parse_rig_trajectories, parse_sequence_tracks
from nurec_jax.render import RenderOptions
from nurec_jax.server import convert, requests, warmup
from nurec_jax.server.request_errors import FailedPrecondition, InvalidArgument, OutOfRange

FRONT = "camera_front_wide_120fov"
SA, SB = hm.TWO_SEQ
TA, TB = hm.TWO_SEQ_T0
SID = "two-seq-scene"


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory):
    return str(hm.two_sequence_scene(tmp_path_factory.mktemp("twoseq") / "two.usdz"))


@pytest.fixture(scope="module")
def meta(scene_path):
    return nurec_jax.read_scene_metadata(scene_path)


# ------------------------------------------------------------------------------------------------
# Metadata


def test_every_camera_reports_its_own_frames(meta):
    assert meta.scene_id == SID  # from data_info.json (no metadata.yaml)
    assert [t.sequence_id for t in meta.trajectories] == [SA, SB]
    assert [t.trajectory_idx for t in meta.trajectories] == [0, 1]
    assert meta.trajectory is meta.trajectories[0]
    got = [
        (
            c.key,
            c.logical_id,
            c.trajectory_idx,
            c.sequence_id,
            len(c.frame_timestamps_us),
            c.linear_start_frame_index,
            c.frame_T_rig_world is not None,
        )
        for c in meta.camera_list
    ]
    assert got == [
        (f"{FRONT}@{SA}", FRONT, 0, SA, 2, 0, False),
        (f"{FRONT}@{SB}", FRONT, 1, SB, 3, 3, True),
        (f"camera_rear_b@{SB}", "camera_rear_b", 1, SB, 1, 6, False),  # no sequence_id: the key's suffix
        (f"camera_side_a@{SA}", "camera_side_a", 0, SA, 1, 2, False),
    ]
    b = meta.camera_list[1]
    assert b.frame_T_rig_world.shape == (3, 2, 4, 4)
    assert b.frame_timestamps_us[0].tolist() == [TB + 50_000, TB + 80_000]
    # Backward compatible views: the first calibration of each logical id, trajectory 0.
    assert list(meta.cameras) == [FRONT, "camera_rear_b", "camera_side_a"]
    assert meta.cameras[FRONT].trajectory_idx == 0 and meta.cameras[FRONT].intrinsics.resolution == (1920, 1080)
    # Time range: the union of both trajectories.
    assert meta.time_range_us == (TA, TB + 300_000)


def test_camera_lookup(meta):
    assert meta.camera(FRONT).key == f"{FRONT}@{SA}"
    assert meta.camera(FRONT, 0).key == f"{FRONT}@{SA}"
    assert meta.camera(FRONT, 1).key == f"{FRONT}@{SB}"
    assert meta.camera(FRONT, 1).intrinsics.resolution == (1600, 1200)
    with pytest.raises(KeyError, match="camera_side_a.*trajectory 1.*trajectories \\[0\\]"):
        meta.camera("camera_side_a", 1)
    with pytest.raises(KeyError, match="no camera 'nope'"):
        meta.camera("nope")
    assert meta.trajectory_of(meta.camera(FRONT, 1)) is meta.trajectories[1]


def test_null_lidar_model_is_tolerated(meta):
    (lid,) = meta.lidar_list
    assert (lid.logical_id, lid.model, dict(lid.parameters), lid.trajectory_idx) == ("lidar_top_360fov", "", {}, 0)
    assert lid.linear_start_frame_index == 0 and lid.unique_sensor_idx == 4
    assert meta.lidars["lidar_top_360fov"] is lid
    with pytest.raises(ValueError, match="lidar_model is null"):
        lidar_models.from_calibration(lid)


def test_single_trajectory_view_and_format_errors():
    doc = hm.two_sequence_rig()
    cams, lidars, traj, w2n, twb = parse_rig_trajectories(doc)
    assert traj.sequence_id == SA and cams[FRONT].trajectory_idx == 0 and set(lidars) == {"lidar_top_360fov"}
    # A calibration of neither sequence, with two trajectories, belongs nowhere.
    bad = hm.two_sequence_rig()
    cal = bad["camera_calibrations"].pop(f"camera_rear_b@{SB}")
    bad["camera_calibrations"]["camera_rear_b@elsewhere"] = cal
    with pytest.raises(SceneFormatError, match=r"camera_rear_b@elsewhere.*belongs to no rig trajectory"):
        parse_rig_document(bad)
    # Recorded frame poses must match the frame windows.
    bad = hm.two_sequence_rig()
    bad["rig_trajectories"][1]["cameras_frame_T_rig_worlds"][f"{FRONT}@{SB}"].pop()
    with pytest.raises(
        SceneFormatError,
        match=r"rig_trajectories\[1\].cameras_frame_T_rig_worlds.*expected shape "
        r"\[3, 2, 4, 4\]",
    ):
        parse_rig_document(bad)
    bad = hm.two_sequence_rig()
    bad["rig_trajectories"][0]["cameras_linear_start_frame_indices"][f"{FRONT}@{SA}"] = "x"
    with pytest.raises(SceneFormatError, match="cameras_linear_start_frame_indices"):
        parse_rig_document(bad)
    bad = hm.two_sequence_rig()
    bad["lidar_calibrations"][f"lidar_top_360fov@{SA}"]["lidar_model"] = [1, 2]
    with pytest.raises(SceneFormatError, match="lidar_model: expected an object or null"):
        parse_rig_document(bad)
    # One trajectory: a calibration of another sequence still belongs to it.
    one = hm.two_sequence_rig()
    one["rig_trajectories"].pop()
    rig = parse_rig_document(one)
    assert [c.trajectory_idx for c in rig.cameras] == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------------------
# Camera poses


def _m(pose) -> np.ndarray:
    return np.asarray(pose.as_matrix(), np.float64)  # float32 (JAX without x64)


def test_rig_camera_poses_recorded_and_interpolated(meta):
    b = meta.camera(FRONT, 1)
    s, e = (int(t) for t in b.frame_timestamps_us[1])
    pair = renderer.rig_camera_poses(meta, FRONT, s, e, np.float64, trajectory_idx=1)
    np.testing.assert_allclose(_m(pair.start), b.frame_T_rig_world[1, 0] @ b.T_sensor_rig, atol=2e-5)
    np.testing.assert_allclose(_m(pair.end), b.frame_T_rig_world[1, 1] @ b.T_sensor_rig, atol=2e-5)
    # The fixture's recorded poses are the interpolated ones moved 0.5 m up: they really differ.
    interp = meta.trajectories[1].pose_at(s)
    np.testing.assert_allclose(b.frame_T_rig_world[1, 0][:3, :3], interp[:3, :3], atol=1e-9)
    np.testing.assert_allclose(b.frame_T_rig_world[1, 0][:3, 3] - interp[:3, 3], [0, 0, 0.5], atol=1e-9)
    # Not a recorded window: trajectory B is interpolated.
    other = renderer.rig_camera_poses(meta, FRONT, s + 1, e, np.float64, trajectory_idx=1)
    np.testing.assert_allclose(_m(other.start), meta.trajectories[1].pose_at(s + 1) @ b.T_sensor_rig, atol=2e-5)
    np.testing.assert_allclose(_m(other.end), meta.trajectories[1].pose_at(e) @ b.T_sensor_rig, atol=2e-5)
    # No trajectory_idx: the first calibration (trajectory A, no recorded poses).
    a = meta.camera(FRONT)
    sa, ea = (int(t) for t in a.frame_timestamps_us[1])
    first = renderer.rig_camera_poses(meta, FRONT, sa, ea, np.float64)
    np.testing.assert_allclose(_m(first.start), meta.trajectories[0].pose_at(sa) @ a.T_sensor_rig, atol=2e-5)
    # The camera only in B interpolates B's trajectory.
    rear = meta.camera("camera_rear_b")
    p = renderer.rig_camera_poses(meta, "camera_rear_b", TB, TB + 20_000, np.float64)
    np.testing.assert_allclose(_m(p.start), meta.trajectories[1].pose_at(TB) @ rear.T_sensor_rig, atol=2e-5)


def test_warmup_plans_every_calibration(meta):
    jobs = list(warmup.camera_jobs(meta, height=24))
    assert [(cam_id, cam.width, cam.height) for cam_id, cam, _, _ in jobs] == [
        (FRONT, 42, 24),
        (FRONT, 32, 24),
        ("camera_rear_b", 32, 24),
        ("camera_side_a", 32, 24),
    ]
    _, _, pose, (s, e) = jobs[1]  # B's middle frame: its recorded pose
    b = meta.camera(FRONT, 1)
    assert (s, e) == tuple(int(t) for t in b.frame_timestamps_us[1])
    np.testing.assert_allclose(
        np.asarray(pose.start.as_matrix()), b.frame_T_rig_world[1, 0] @ b.T_sensor_rig, atol=1e-4
    )


# ------------------------------------------------------------------------------------------------
# Request validation (no server)


def _rgb_request(meta, cal, trajectory_idx=None, height=36):
    """A render request for `cal`'s first recorded frame; the CameraSpec names `cal.logical_id` and
    `trajectory_idx` (default: the calibration's own)."""
    s, e = (int(t) for t in cal.frame_timestamps_us[0])
    pair = renderer.rig_camera_poses(meta, cal.logical_id, s, e, trajectory_idx=cal.trajectory_idx)
    idx = cal.trajectory_idx if trajectory_idx is None else trajectory_idx
    spec = sensorsim_pb2.CameraSpec(logical_id=cal.logical_id, trajectory_idx=idx)
    return sensorsim_pb2.RGBRenderRequest(
        scene_id=meta.scene_id,
        resolution_h=height,
        resolution_w=0,
        camera_intrinsics=spec,
        frame_start_us=s,
        frame_end_us=e,
        image_format=sensorsim_pb2.PNG,
        sensor_pose=sensorsim_pb2.PosePair(
            start_pose=convert.se3_to_grpc_pose(_m(pair.start)), end_pose=convert.se3_to_grpc_pose(_m(pair.end))
        ),
    )


def test_requests_pick_the_calibration_of_their_trajectory(meta):
    def size(req):
        job = requests.prepare_rgb(meta, req, editing_enabled=False)
        return job.camera.width, job.camera.height

    assert size(_rgb_request(meta, meta.camera(FRONT, 0))) == (64, 36)  # 1920x1080
    assert size(_rgb_request(meta, meta.camera(FRONT, 1))) == (48, 36)  # 1600x1200
    # Index 0 (the proto default) finds a camera only one other trajectory holds.
    assert size(_rgb_request(meta, meta.camera("camera_rear_b"), 0)) == (48, 36)
    with pytest.raises(InvalidArgument, match=r"camera_intrinsics.trajectory_idx: 2 names no rig trajectory"):
        requests.prepare_rgb(meta, _rgb_request(meta, meta.camera(FRONT), 2), editing_enabled=False)
    req = _rgb_request(meta, meta.camera("camera_side_a"), 1)
    with pytest.raises(
        InvalidArgument,
        match=r"camera_intrinsics.trajectory_idx: camera 'camera_side_a' is not in "
        r"trajectory 1.*trajectories \[0\]",
    ):
        requests.prepare_rgb(meta, req, editing_enabled=False)


def test_time_ranges_are_the_union_of_the_trajectories(meta):
    for window in ((TA, TA + 1), (TA + 200_000, TA + 200_001), (TB + 250_000, TB + 300_001)):
        requests.check_interval(meta, *window)
    for window in (
        (TA + 200_000, TA + 200_002),
        (TA + 1_000_000, TA + 1_000_001),
        (TB - 1, TB + 1),
        (TB + 300_000, TB + 300_002),
    ):
        with pytest.raises(OutOfRange, match=rf"\[{TA}, {TA + 200_001}\), \[{TB}, {TB + 300_001}\)"):
            requests.check_interval(meta, *window)


def test_null_model_lidar_request_is_refused(meta):
    req = sensorsim_pb2.LidarRenderRequest(scene_id=SID, frame_start_us=TA, frame_end_us=TA + 100_000)
    with pytest.raises(FailedPrecondition, match=r"lidar_top_360fov@clipgt-seq-a.*lidar_model is null"):
        requests.prepare_lidar(meta, req, editing_enabled=False)


# ------------------------------------------------------------------------------------------------
# sequence_tracks.json and the scene id


def test_sequence_tracks_of_several_sequences_are_merged(meta):
    assert sorted(meta.tracks) == ["12", "3", "7"]
    assert meta.tracks["7"].label == "automobile" and meta.tracks["12"].label == "person"
    with pytest.raises(SceneFormatError, match=rf"track '7' is in sequences '{SA}' and '{SB}' with different data"):
        parse_sequence_tracks(hm.two_sequence_tracks(conflict=True))
    assert parse_sequence_tracks({}) == {}


def test_scene_id_from_data_info(tmp_path):
    def sid(data_info, name):
        return nurec_jax.read_scene_metadata(
            hm.two_sequence_scene(tmp_path / f"{name}.usdz", data_info=data_info)
        ).scene_id

    assert sid(b'{"sequence_id": "clip-x"}', "a") == "clip-x"
    assert sid(None, "missing") == "missing"
    assert sid(b'{"sequence_id": 5}', "number") == "number"
    assert sid(b'{"sequence_id": ""}', "empty") == "empty"
    assert sid(b"[1, 2]", "list") == "list"
    with pytest.raises(SceneFormatError, match=r"data_info.json: invalid JSON"):
        sid(b"{nope", "broken")
    # metadata.yaml's scene_id still comes first (the sample scene has both).
    assert nurec_jax.read_scene_metadata(nurec_jax.sample_scene_path()).scene_id == "clipgt-sample-street-0001"


def test_describe_and_scene_info_list_trajectories(scene_path):
    text = scene_lib.describe(scene_lib.load_host_scene(scene_path))
    assert "ego trajectory 1: 4 poses over 0.30 s" in text and f"sequence '{SB}'" in text
    assert "trajectory 1: 3 frames, recorded frame poses" in text and "(no lidar model)" in text
    out = subprocess.run(
        [sys.executable, "-m", "nurec_jax.cli.scene_info", f"--scene={scene_path}", "--metadata_only"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr
    assert "4 cameras, 1 lidars, 3 tracks, trajectories: 2" in out.stdout
    assert "trajectory 1: 3 frames, recorded frame poses" in out.stdout
    assert "camera_side_a" in out.stdout and f"sequence '{SA}'" in out.stdout


# ------------------------------------------------------------------------------------------------
# The gRPC server


@pytest.fixture(scope="module")
def server(scene_path, tmp_path_factory):
    from nurec_jax.renderer import Renderer
    from nurec_jax.server.app import create_server
    from nurec_jax.server.options import ServerOptions

    opts = ServerOptions(
        artifact_glob=scene_path, port=0, max_workers=1, download_cache_dir=str(tmp_path_factory.mktemp("dl"))
    )
    srv, port = create_server("127.0.0.1:0", opts, renderer=Renderer(RenderOptions(pair_capacity=1 << 14)))
    assert srv.serving.wait(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield sensorsim_pb2_grpc.SensorsimServiceStub(channel)
    channel.close()
    srv.stop(1)


@pytest.mark.xdist_group("grpc")
def test_servicer_lists_every_trajectory_and_camera(server, meta):
    trajs = server.get_available_trajectories(
        sensorsim_pb2.AvailableTrajectoriesRequest(scene_id=SID)
    ).available_trajectories
    assert [t.trajectory_idx for t in trajs] == [0, 1]
    assert [len(t.trajectory.poses) for t in trajs] == [3, 4]
    assert trajs[1].trajectory.poses[0].timestamp_us == TB
    cams = server.get_available_cameras(sensorsim_pb2.AvailableCamerasRequest(scene_id=SID)).available_cameras
    assert [(c.logical_id, c.trajectory_idx, c.intrinsics.trajectory_idx, c.intrinsics.resolution_w) for c in cams] == [
        (FRONT, 0, 0, 1920),
        (FRONT, 1, 1, 1600),
        ("camera_rear_b", 1, 1, 640),
        ("camera_side_a", 0, 0, 640),
    ]
    np.testing.assert_allclose(
        np.asarray(convert.grpc_pose_to_se3(cams[1].rig_to_camera)), meta.camera(FRONT, 1).T_sensor_rig, atol=1e-6
    )


@pytest.mark.xdist_group("grpc")
def test_render_with_trajectory_idx_uses_that_calibration(server, meta):
    def image(req):
        reply = server.render_rgb(req, timeout=300)
        return np.asarray(Image.open(io.BytesIO(reply.image_bytes)))

    assert image(_rgb_request(meta, meta.camera(FRONT, 1))).shape[:2] == (36, 48)  # B's 1600x1200 camera
    assert image(_rgb_request(meta, meta.camera(FRONT, 0))).shape[:2] == (36, 64)  # A's 1920x1080 camera
    with pytest.raises(grpc.RpcError) as info:
        server.render_rgb(_rgb_request(meta, meta.camera(FRONT), 7), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "camera_intrinsics.trajectory_idx" in info.value.details()
    req = _rgb_request(meta, meta.camera("camera_side_a"), 1)
    with pytest.raises(grpc.RpcError) as info:
        server.render_rgb(req, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "camera_intrinsics.trajectory_idx: camera 'camera_side_a' is not in trajectory 1" in info.value.details()
    lidar = sensorsim_pb2.LidarRenderRequest(
        scene_id=SID,
        frame_start_us=TA,
        frame_end_us=TA + 100_000,
        sensor_pose=_rgb_request(meta, meta.camera(FRONT)).sensor_pose,
    )
    with pytest.raises(grpc.RpcError) as info:
        server.render_lidar(lidar, timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "lidar_model is null" in info.value.details()


def test_render_frame_cli_trajectory_idx(scene_path, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nurec_jax.cli.render_frame",
            f"--scene={scene_path}",
            f"--output_dir={tmp_path}",
            f"--cameras={FRONT}",
            "--frames=2",
            "--width=32",
            "--trajectory_idx=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr
    img = Image.open(tmp_path / f"{SID}_{FRONT}_t1_0002.png")
    assert img.size == (32, 24)  # B's 4:3 camera
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "nurec_jax.cli.render_frame",
            f"--scene={scene_path}",
            f"--output_dir={tmp_path}",
            "--cameras=camera_side_a",
            "--trajectory_idx=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert bad.returncode != 0 and "in trajectory 1" in bad.stderr
