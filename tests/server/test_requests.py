"""Request validation: each malformed field gets the right error class and a message naming it."""

import dataclasses
import math

import numpy as np
import pytest

from nurec_jax import data, read_scene_metadata
from nurec_jax._proto import common_pb2, sensorsim_pb2
from nurec_jax.server import convert, requests
from nurec_jax.server.request_errors import InvalidArgument, NotFound, OutOfRange, status_of

CAM = "camera_front_wide_120fov"


@pytest.fixture(scope="module")
def meta():
    return read_scene_metadata(data.sample_scene_path())


def _request(meta, **over):
    cal = meta.cameras[CAM]
    s, e = (int(t) for t in cal.frame_timestamps_us[5])
    rig = meta.trajectory.pose_at(s) if meta.trajectory is not None else np.eye(4)
    pose = convert.se3_to_grpc_pose(rig @ cal.T_sensor_rig)
    req = sensorsim_pb2.RGBRenderRequest(
        scene_id=meta.scene_id,
        resolution_h=54,
        resolution_w=96,
        camera_intrinsics=sensorsim_pb2.CameraSpec(logical_id=CAM),
        frame_start_us=s,
        frame_end_us=e,
        sensor_pose=sensorsim_pb2.PosePair(start_pose=pose, end_pose=pose),
        image_format=sensorsim_pb2.PNG,
    )
    for k, v in over.items():
        if isinstance(v, type(req.sensor_pose)) or hasattr(v, "DESCRIPTOR"):
            getattr(req, k).CopyFrom(v)
        else:
            setattr(req, k, v)
    return req


def _raises(cls, meta, match, editing=False, **over):
    with pytest.raises(cls, match=match):
        requests.prepare_rgb(meta, _request(meta, **over), editing_enabled=editing)


def test_valid_request_uses_nurec_output_size(meta):
    job = requests.prepare_rgb(meta, _request(meta, resolution_h=320, resolution_w=512), editing_enabled=False)
    # 1920x1080 native, 512x320 asked: height wins -> 568x320 (int(320 * 16 / 9)).
    assert (job.camera.width, job.camera.height) == (int(320 * 1920 / 1080), 320)
    assert job.actor_overrides is None and job.ego_mask is None


def test_field_errors(meta):
    _raises(InvalidArgument, meta, "image_format", image_format=sensorsim_pb2.UNDEFINED)
    _raises(InvalidArgument, meta, "image_format", image_format=sensorsim_pb2.AV1)
    _raises(InvalidArgument, meta, "image_quality", image_format=sensorsim_pb2.JPEG, image_quality=0)
    _raises(InvalidArgument, meta, "resolution_w/resolution_h: both are 0", resolution_h=0, resolution_w=0)
    _raises(InvalidArgument, meta, "exceeds 16384", resolution_h=100000, resolution_w=0)
    _raises(InvalidArgument, meta, "gives an output of 1x0", resolution_h=0, resolution_w=1)
    _raises(
        NotFound,
        meta,
        "camera_intrinsics.logical_id: camera 'nope'",
        camera_intrinsics=sensorsim_pb2.CameraSpec(logical_id="nope"),
    )
    _raises(
        InvalidArgument, meta, "neither a camera_param nor a logical_id", camera_intrinsics=sensorsim_pb2.CameraSpec()
    )
    nan_pose = common_pb2.Pose(vec=common_pb2.Vec3(x=math.nan), quat=common_pb2.Quat(w=1))
    _raises(
        InvalidArgument,
        meta,
        "sensor_pose.start_pose: non-finite",
        sensor_pose=sensorsim_pb2.PosePair(start_pose=nan_pose, end_pose=nan_pose),
    )
    zero_q = common_pb2.Pose(quat=common_pb2.Quat())
    good = common_pb2.Pose(quat=common_pb2.Quat(w=1))
    _raises(
        InvalidArgument,
        meta,
        "sensor_pose.end_pose.quat: zero-norm",
        sensor_pose=sensorsim_pb2.PosePair(start_pose=good, end_pose=zero_q),
    )
    req = _request(meta)
    req.ClearField("sensor_pose")
    with pytest.raises(InvalidArgument, match="sensor_pose: missing"):
        requests.prepare_rgb(meta, req, editing_enabled=False)
    # Status codes of the mapping.
    assert status_of(InvalidArgument("x"))[0].name == "INVALID_ARGUMENT"
    assert status_of(ValueError("x"))[0].name == "INVALID_ARGUMENT"
    assert status_of(MemoryError("x"))[0].name == "RESOURCE_EXHAUSTED"
    assert (
        status_of(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))[0].name
        == "RESOURCE_EXHAUSTED"
    )


def test_time_interval(meta):
    first = int(meta.trajectory.timestamps_us[0])
    last = int(meta.trajectory.timestamps_us[-1])
    _raises(OutOfRange, meta, r"\[t, t\+1\)", frame_start_us=first + 10, frame_end_us=first + 10)
    _raises(OutOfRange, meta, "outside the time range", frame_start_us=first - 5, frame_end_us=first + 5)
    _raises(OutOfRange, meta, "outside the time range", frame_start_us=last, frame_end_us=last + 2)
    # The last instant itself is allowed: [last, last + 1).
    requests.prepare_rgb(meta, _request(meta, frame_start_us=last, frame_end_us=last + 1), editing_enabled=False)
    # A scene without a trajectory accepts any non-empty interval.
    plain = dataclasses.replace(meta, trajectory=None)
    requests.prepare_rgb(plain, _request(plain, frame_start_us=5, frame_end_us=6), editing_enabled=False)
    with pytest.raises(OutOfRange):
        requests.prepare_rgb(plain, _request(plain, frame_start_us=6, frame_end_us=6), editing_enabled=False)


def test_novel_camera_with_unknown_logical_id(meta):
    spec = convert.camera_spec_from_intrinsics("my_new_camera", meta.cameras["camera_rear_pinhole_70fov"].intrinsics)
    spec.opencv_pinhole_param.focal_length_x *= 0.5
    job = requests.prepare_rgb(
        meta, _request(meta, camera_intrinsics=spec, resolution_h=72, resolution_w=0), editing_enabled=False
    )
    assert (job.camera.width, job.camera.height) == (128, 72)
    bad = sensorsim_pb2.CameraSpec()
    bad.CopyFrom(spec)
    bad.opencv_pinhole_param.focal_length_y = -1
    _raises(InvalidArgument, meta, "opencv_pinhole_param.focal_length", camera_intrinsics=bad)


def test_dynamic_objects(meta):
    cal = meta.cameras[CAM]
    s, e = (int(t) for t in cal.frame_timestamps_us[5])
    track = meta.tracks["3"]
    obj = sensorsim_pb2.DynamicObject(
        track_id="3",
        pose_pair=sensorsim_pb2.PosePair(
            start_pose=convert.se3_to_grpc_pose(track.pose_at(s)), end_pose=convert.se3_to_grpc_pose(track.pose_at(e))
        ),
    )
    req = _request(meta)
    req.dynamic_objects.append(obj)
    with pytest.raises(InvalidArgument, match="--enable-editing-actors"):
        requests.prepare_rgb(meta, req, editing_enabled=False)
    job = requests.prepare_rgb(meta, req, editing_enabled=True)
    np.testing.assert_allclose(job.actor_overrides["3"][0], track.pose_at(s), atol=1e-6)
    # Listed actors are posed, unlisted controllable ones removed, others as recorded.
    track_ids = ("7", "3", "30", "21", "15", "12", "42")
    poses = requests.job_actor_poses(meta, track_ids, job)
    visible = dict(zip(track_ids, np.asarray(poses.visible)))
    assert visible["3"]
    for tid in track_ids:
        if tid != "3" and meta.tracks[tid].is_controllable:
            assert not visible[tid], tid
    recorded = requests.job_actor_poses(meta, track_ids, dataclasses.replace(job, actor_overrides=None))
    assert np.asarray(recorded.visible).sum() > 1
    bad = _request(meta)
    bad.dynamic_objects.append(sensorsim_pb2.DynamicObject(track_id="999", pose_pair=obj.pose_pair))
    with pytest.raises(InvalidArgument, match=r"dynamic_objects\[0\].track_id: '999'"):
        requests.prepare_rgb(meta, bad, editing_enabled=True)
    twice = _request(meta)
    twice.dynamic_objects.extend([obj, obj])
    with pytest.raises(InvalidArgument, match="listed twice"):
        requests.prepare_rgb(meta, twice, editing_enabled=True)


def test_ego_mask_id_required(meta):
    _raises(InvalidArgument, meta, "ego_mask_id: required", insert_ego_mask=True)


def _ego_request(meta, ego_shift=(0.0, 0.0, 0.0), sensor=True, logical_id=CAM):
    """A request carrying the rig pose (ego_pose) of frame 5, with or without the matching sensor_pose."""
    cal = meta.cameras[CAM]
    s = int(cal.frame_timestamps_us[5][0])
    rig = meta.trajectory.pose_at(s).copy()
    ego = convert.se3_to_grpc_pose(rig)
    rig[:3, 3] += ego_shift
    req = _request(meta, camera_intrinsics=sensorsim_pb2.CameraSpec(logical_id=logical_id))
    req.ego_pose.CopyFrom(sensorsim_pb2.PosePair(start_pose=convert.se3_to_grpc_pose(rig), end_pose=ego))
    if not sensor:
        req.ClearField("sensor_pose")
    return req


def test_ego_pose_alone_is_composed_with_the_camera_mount(meta):
    with_sensor = requests.prepare_rgb(meta, _request(meta), editing_enabled=False)
    ego_only = requests.prepare_rgb(meta, _ego_request(meta, sensor=False), editing_enabled=False)
    # The same camera pose, whether sent as sensor_pose or derived from ego_pose and the camera's mount.
    np.testing.assert_allclose(
        np.asarray(ego_only.sensor_pose.start.as_matrix()),
        np.asarray(with_sensor.sensor_pose.start.as_matrix()),
        atol=2e-5,
    )
    np.testing.assert_allclose(
        np.asarray(ego_only.sensor_pose.end.as_matrix()), np.asarray(with_sensor.sensor_pose.end.as_matrix()), atol=2e-5
    )
    # The mount really enters: the camera is not at the rig origin.
    cal = meta.cameras[CAM]
    assert np.linalg.norm(cal.T_sensor_rig[:3, 3]) > 0.1


def test_ego_pose_and_sensor_pose_must_agree(meta):
    requests.prepare_rgb(meta, _ego_request(meta, ego_shift=(0.004, 0.0, 0.0)), editing_enabled=False)  # 4 mm
    req = _ego_request(meta, ego_shift=(0.5, 0.0, 0.0))
    with pytest.raises(InvalidArgument) as e:
        requests.prepare_rgb(meta, req, editing_enabled=False)
    assert "sensor_pose.start_pose and ego_pose.start_pose disagree" in str(e.value) and "50.00 cm" in str(e.value)
    # A rotation of the rig alone (0.5 deg about z) is a disagreement too.
    req = _ego_request(meta)
    rig = meta.trajectory.pose_at(int(meta.cameras[CAM].frame_timestamps_us[5][0]))
    c, s = np.cos(np.deg2rad(0.5)), np.sin(np.deg2rad(0.5))
    turned = rig @ np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    req.ego_pose.end_pose.CopyFrom(convert.se3_to_grpc_pose(turned))
    with pytest.raises(InvalidArgument, match=r"sensor_pose.end_pose and ego_pose.end_pose disagree: .* 0.500 deg"):
        requests.prepare_rgb(meta, req, editing_enabled=False)


def test_ego_pose_needs_a_mount_or_a_sensor_pose(meta):
    novel = _ego_request(meta, sensor=False, logical_id="roof_cam_novel")
    novel.camera_intrinsics.CopyFrom(
        convert.camera_spec_from_intrinsics("roof_cam_novel", meta.cameras[CAM].intrinsics)
    )
    with pytest.raises(InvalidArgument, match="ego_pose: without a sensor_pose .* 'roof_cam_novel' names no camera"):
        requests.prepare_rgb(meta, novel, editing_enabled=False)
    novel.sensor_pose.CopyFrom(_request(meta).sensor_pose)  # with its own pose a novel camera renders
    requests.prepare_rgb(meta, novel, editing_enabled=False)
    req = _request(meta)
    req.ClearField("sensor_pose")
    with pytest.raises(InvalidArgument, match="sensor_pose: missing"):
        requests.prepare_rgb(meta, req, editing_enabled=False)
