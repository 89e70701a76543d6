"""Proto <-> nurec-jax conversions: NuRec's pose convention, camera specs both ways, field-named errors."""

import math

import numpy as np
import pytest

import nurec_jax
from nurec_jax import cameras, geometry
from nurec_jax._proto import common_pb2, sensorsim_pb2
from nurec_jax.server import convert

META = nurec_jax.read_scene_metadata(nurec_jax.sample_scene_path())


def test_pose_convention_and_round_trips():
    # 90 degree yaw: quaternion (w, x, y, z) = (cos 45, 0, 0, sin 45); p_parent = R p_child + t.
    pose = common_pb2.Pose(
        vec=common_pb2.Vec3(x=1, y=2, z=3), quat=common_pb2.Quat(w=math.cos(math.pi / 4), z=math.sin(math.pi / 4))
    )
    m = np.asarray(convert.grpc_pose_to_se3(pose))
    np.testing.assert_allclose(m[:3, :3] @ [1.0, 0, 0] + m[:3, 3], [1.0, 3.0, 3.0], atol=1e-6)
    tq = convert.grpc_pose_to_tquat(pose)
    np.testing.assert_allclose(tq, [1, 2, 3, 0, 0, math.sin(math.pi / 4), math.cos(math.pi / 4)], atol=1e-7)
    back = convert.tquat_to_grpc_pose(tq)
    assert back.quat.w == pytest.approx(pose.quat.w) and back.vec.y == 2.0
    rng = np.random.default_rng(0)
    for _ in range(5):
        t = geometry.make_transform(geometry.quat_wxyz_to_matrix(rng.normal(size=4)), rng.normal(size=3))
        np.testing.assert_allclose(np.asarray(convert.grpc_pose_to_se3(convert.se3_to_grpc_pose(t))), t, atol=1e-6)


def test_unnormalised_quaternion_is_normalised_and_zero_rejected():
    pose = common_pb2.Pose(quat=common_pb2.Quat(w=2.0))
    np.testing.assert_allclose(convert.grpc_pose_to_tquat(pose)[3:], [0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"sensor_pose.start_pose.quat: zero-norm quaternion"):
        convert.grpc_pose_to_tquat(common_pb2.Pose(), "sensor_pose.start_pose")
    with pytest.raises(ValueError, match="non-finite"):
        convert.grpc_pose_to_tquat(common_pb2.Pose(vec=common_pb2.Vec3(x=float("nan")), quat=common_pb2.Quat(w=1)))


@pytest.mark.parametrize("cam_id", sorted(META.cameras))
def test_camera_spec_round_trip(cam_id):
    cal = META.cameras[cam_id]
    avail = convert.available_camera(cal)
    assert avail.logical_id == cam_id and avail.intrinsics.logical_id == cam_id
    # rig_to_camera carries camera -> rig (T_sensor_rig).
    np.testing.assert_allclose(np.asarray(convert.grpc_pose_to_se3(avail.rig_to_camera)), cal.T_sensor_rig, atol=1e-6)
    wire = sensorsim_pb2.CameraSpec.FromString(avail.intrinsics.SerializeToString())
    intr = convert.intrinsics_from_camera_spec(wire)
    a = cameras.camera_from_intrinsics(cal.intrinsics)
    b = cameras.camera_from_intrinsics(intr)
    p = np.array([[0.3, -0.2, 2.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(np.asarray(b.project(p)[0]), np.asarray(a.project(p)[0]), atol=1e-3)
    assert (b.width, b.height, b.shutter_type) == (a.width, a.height, a.shutter_type)


def test_camera_spec_without_param_means_the_scene_camera():
    assert convert.intrinsics_from_camera_spec(sensorsim_pb2.CameraSpec(logical_id="x")) is None


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda s: setattr(s, "resolution_w", 0), r"camera_intrinsics.resolution_w/resolution_h: must be positive"),
        (
            lambda s: s.opencv_pinhole_param.CopyFrom(
                sensorsim_pb2.OpenCVPinholeCameraParam(focal_length_x=-1, focal_length_y=1)
            ),
            r"opencv_pinhole_param.focal_length_x/focal_length_y: must be positive",
        ),
        (
            lambda s: s.ftheta_param.CopyFrom(sensorsim_pb2.FthetaCameraParam(reference_poly=1)),
            r"ftheta_param: the reference polynomial \(PIXELDIST_TO_ANGLE\) is missing or empty",
        ),
        (
            lambda s: s.ftheta_param.CopyFrom(sensorsim_pb2.FthetaCameraParam(reference_poly=0)),
            r"ftheta_param.reference_poly",
        ),
        (
            lambda s: s.opencv_fisheye_param.CopyFrom(
                sensorsim_pb2.OpenCVFisheyeCameraParam(
                    focal_length_x=1, focal_length_y=1, radial_coeffs=[0, 0, 0, 0, 0]
                )
            ),
            r"radial_coeffs: expected at most 4",
        ),
        (
            lambda s: s.opencv_fisheye_param.CopyFrom(
                sensorsim_pb2.OpenCVFisheyeCameraParam(focal_length_x=1, focal_length_y=1, max_angle=-0.5)
            ),
            r"opencv_fisheye_param.max_angle: -0.5 not in \(0, pi\]",
        ),
        (
            lambda s: s.ftheta_param.CopyFrom(
                sensorsim_pb2.FthetaCameraParam(
                    reference_poly=1, pixeldist_to_angle_poly=[0, 1e-3], max_angle=float("nan")
                )
            ),
            r"ftheta_param.max_angle",
        ),
    ],
)
def test_bad_camera_specs_name_the_field(mutate, message):
    spec = sensorsim_pb2.CameraSpec(resolution_w=640, resolution_h=480)
    spec.opencv_pinhole_param.CopyFrom(sensorsim_pb2.OpenCVPinholeCameraParam(focal_length_x=500, focal_length_y=500))
    mutate(spec)
    with pytest.raises(ValueError, match=message):
        convert.intrinsics_from_camera_spec(spec)


def test_trajectory_to_proto():
    traj = META.trajectory
    msg = convert.trajectory_to_proto(traj.timestamps_us, traj.T_rig_world)
    assert len(msg.poses) == len(traj.timestamps_us)
    assert msg.poses[5].timestamp_us == int(traj.timestamps_us[5])
    np.testing.assert_allclose(np.asarray(convert.grpc_pose_to_se3(msg.poses[5].pose)), traj.T_rig_world[5], atol=1e-5)


def test_scene_files_and_requests_share_one_intrinsics_validator():
    """The same bad value is refused with the same words whether it comes from a scene file or a request."""
    from nurec_jax.errors import SceneFormatError
    from nurec_jax.metadata import parse_camera_model

    model = {
        "type": "ftheta",
        "parameters": {
            "resolution": [640, 480],
            "principal_point": [320, 240],
            "pixeldist_to_angle_poly": [0, 1e-3],
            "linear_cde": [2.0, 1.0, 2.0],
        },
    }
    with pytest.raises(SceneFormatError, match=r"cam.parameters.linear_cde: singular \(c - d\*e = 0\)"):
        parse_camera_model(model, "cam")
    spec = sensorsim_pb2.CameraSpec(resolution_w=640, resolution_h=480)
    spec.ftheta_param.CopyFrom(
        sensorsim_pb2.FthetaCameraParam(
            reference_poly=1,
            pixeldist_to_angle_poly=[0, 1e-3],
            linear_cde=sensorsim_pb2.LinearCde(linear_c=2.0, linear_d=1.0, linear_e=2.0),
        )
    )
    with pytest.raises(ValueError, match=r"camera_intrinsics.ftheta_param.linear_cde: singular \(c - d\*e = 0\)"):
        convert.intrinsics_from_camera_spec(spec)
