"""Pure conversions between NuRec's protobuf messages and nurec-jax types.

Pose convention (protocol.md 7.1): `Pose{vec, quat}` is the child -> parent transform
`p_parent = R(quat) p_child + vec`, quaternion Hamilton (w, x, y, z) by field name. NRE's helper order
`[x, y, z, qx, qy, qz, qw]` (scipy) is what `grpc_pose_to_tquat` returns.
Errors raise `ValueError` naming the offending field; the servicer maps them to INVALID_ARGUMENT.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from nurec_jax import geometry
from nurec_jax._proto import common_pb2, sensorsim_pb2
from nurec_jax.metadata import (
    CameraCalibration,
    FThetaIntrinsics,
    OpenCVFisheyeIntrinsics,
    OpenCVPinholeIntrinsics,
    PolynomialType,
    ShutterType,
    parse_floats,
    parse_max_angle,
    parse_poly,
)

_MIN_QUAT_NORM = 1e-6


def grpc_pose_to_tquat(pose: common_pb2.Pose, field: str = "pose") -> np.ndarray:
    """Pose -> [x, y, z, qx, qy, qz, qw] (float64, unit quaternion). Rejects NaN and zero quaternions."""
    q = np.array([pose.quat.x, pose.quat.y, pose.quat.z, pose.quat.w], np.float64)
    t = np.array([pose.vec.x, pose.vec.y, pose.vec.z], np.float64)
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))):
        raise ValueError(f"{field}: non-finite value")
    n = np.linalg.norm(q)
    if n < _MIN_QUAT_NORM:
        raise ValueError(f"{field}.quat: zero-norm quaternion (w, x, y, z all ~0)")
    return np.concatenate([t, q / n])


def tquat_to_grpc_pose(tquat) -> common_pb2.Pose:
    """[x, y, z, qx, qy, qz, qw] -> Pose."""
    t = np.asarray(tquat, np.float64)
    return common_pb2.Pose(vec=common_pb2.Vec3(x=t[0], y=t[1], z=t[2]),
                           quat=common_pb2.Quat(w=t[6], x=t[3], y=t[4], z=t[5]))


def grpc_pose_to_se3(pose: common_pb2.Pose, field: str = "pose", dtype=jnp.float32) -> jnp.ndarray:
    """Pose -> 4x4 homogeneous matrix (a JAX array)."""
    return jnp.asarray(geometry.pose7_xyzw_to_matrix(grpc_pose_to_tquat(pose, field)), dtype)


def se3_to_grpc_pose(m) -> common_pb2.Pose:
    """4x4 rigid transform -> Pose."""
    m = np.asarray(m, np.float64)
    q = geometry.matrix_to_quat_wxyz(m[:3, :3])
    return tquat_to_grpc_pose(np.concatenate([m[:3, 3], geometry.wxyz_to_xyzw(q)]))


def trajectory_to_proto(timestamps_us, transforms) -> common_pb2.Trajectory:
    return common_pb2.Trajectory(poses=[
        common_pb2.PoseAtTime(pose=se3_to_grpc_pose(m), timestamp_us=int(t)) for t, m in zip(timestamps_us, transforms)
    ])


def camera_spec_from_intrinsics(logical_id: str, intr) -> sensorsim_pb2.CameraSpec:
    """Scene calibration -> CameraSpec (native resolution, `logical_id` filled)."""
    w, h = intr.resolution
    spec = sensorsim_pb2.CameraSpec(logical_id=logical_id, resolution_w=w, resolution_h=h,
                                    shutter_type=int(intr.shutter_type))
    if isinstance(intr, FThetaIntrinsics):
        spec.ftheta_param.CopyFrom(sensorsim_pb2.FthetaCameraParam(
            principal_point_x=intr.principal_point[0], principal_point_y=intr.principal_point[1],
            reference_poly=int(intr.reference_poly), pixeldist_to_angle_poly=list(intr.pixeldist_to_angle_poly),
            angle_to_pixeldist_poly=list(intr.angle_to_pixeldist_poly), max_angle=intr.max_angle,
            linear_cde=sensorsim_pb2.LinearCde(linear_c=intr.linear_cde[0], linear_d=intr.linear_cde[1],
                                               linear_e=intr.linear_cde[2])))
    elif isinstance(intr, OpenCVPinholeIntrinsics):
        spec.opencv_pinhole_param.CopyFrom(sensorsim_pb2.OpenCVPinholeCameraParam(
            principal_point_x=intr.principal_point[0], principal_point_y=intr.principal_point[1],
            focal_length_x=intr.focal_length[0], focal_length_y=intr.focal_length[1],
            radial_coeffs=list(intr.radial_coeffs), tangential_coeffs=list(intr.tangential_coeffs),
            thin_prism_coeffs=list(intr.thin_prism_coeffs)))
    elif isinstance(intr, OpenCVFisheyeIntrinsics):
        spec.opencv_fisheye_param.CopyFrom(sensorsim_pb2.OpenCVFisheyeCameraParam(
            principal_point_x=intr.principal_point[0], principal_point_y=intr.principal_point[1],
            focal_length_x=intr.focal_length[0], focal_length_y=intr.focal_length[1],
            radial_coeffs=list(intr.radial_coeffs), max_angle=intr.max_angle))
    else:
        raise TypeError(f"unsupported intrinsics {type(intr).__name__}")
    return spec


def available_camera(cal: CameraCalibration) -> sensorsim_pb2.AvailableCamerasReturn.AvailableCamera:
    """`rig_to_camera` carries camera -> rig (T_sensor_rig), as NRE fills it (protocol.md 7.3).
    `trajectory_idx` (also in the intrinsics' CameraSpec, so a copied spec names the same calibration)
    is the index of the rig trajectory the camera belongs to (NRE left both 0)."""
    spec = camera_spec_from_intrinsics(cal.logical_id, cal.intrinsics)
    spec.trajectory_idx = cal.trajectory_idx
    return sensorsim_pb2.AvailableCamerasReturn.AvailableCamera(
        intrinsics=spec, rig_to_camera=se3_to_grpc_pose(cal.T_sensor_rig), logical_id=cal.logical_id,
        trajectory_idx=cal.trajectory_idx)


def _positive_focal(p, field: str) -> tuple[float, float]:
    fl = parse_floats((p.focal_length_x, p.focal_length_y), f"{field}.focal_length", error=ValueError)
    if min(fl) <= 0:
        raise ValueError(f"{field}.focal_length_x/focal_length_y: must be positive, got {fl}")
    return fl


def _principal_point(p, field: str) -> tuple[float, float]:
    return parse_floats((p.principal_point_x, p.principal_point_y), f"{field}.principal_point", error=ValueError)


def _max_angle(value: float, default: float, field: str) -> float:
    # proto3 has no presence for doubles: 0 means unset (AlpaSim's convention).
    return parse_max_angle(None if value == 0 else value, default, f"{field}.max_angle", error=ValueError)


def intrinsics_from_camera_spec(spec: sensorsim_pb2.CameraSpec, field: str = "camera_intrinsics"):
    """CameraSpec with a `camera_param` -> intrinsics at its native resolution. Raises ValueError naming
    the bad field; returns None when no `camera_param` is set (the scene's camera is meant)."""
    which = spec.WhichOneof("camera_param")
    if which is None:
        return None
    w, h = int(spec.resolution_w), int(spec.resolution_h)
    if w <= 0 or h <= 0:
        raise ValueError(f"{field}.resolution_w/resolution_h: must be positive with a camera_param, got {w}x{h}")
    if w > 16384 or h > 16384:
        raise ValueError(f"{field}.resolution_w/resolution_h: {w}x{h} exceeds 16384")
    try:
        shutter = ShutterType(int(spec.shutter_type))
    except ValueError:
        raise ValueError(f"{field}.shutter_type: unknown value {spec.shutter_type}") from None
    if shutter == ShutterType.UNKNOWN:
        shutter = ShutterType.GLOBAL
    if which == "ftheta_param":
        p = spec.ftheta_param
        f = f"{field}.ftheta_param"
        ref = PolynomialType(int(p.reference_poly)) if p.reference_poly in (1, 2) else None
        if ref is None:
            raise ValueError(f"{f}.reference_poly: must be PIXELDIST_TO_ANGLE or ANGLE_TO_PIXELDIST")
        bw = parse_poly(p.pixeldist_to_angle_poly, f"{f}.pixeldist_to_angle_poly", error=ValueError)
        fw = parse_poly(p.angle_to_pixeldist_poly, f"{f}.angle_to_pixeldist_poly", error=ValueError)
        if (ref == PolynomialType.PIXELDIST_TO_ANGLE and not bw) or (ref == PolynomialType.ANGLE_TO_PIXELDIST
                                                                    and not fw):
            raise ValueError(f"{f}: the reference polynomial ({ref.name}) is empty")
        cde = (1.0, 0.0, 0.0)
        if p.HasField("linear_cde"):
            cde = parse_floats((p.linear_cde.linear_c, p.linear_cde.linear_d, p.linear_cde.linear_e),
                               f"{f}.linear_cde", error=ValueError)
            if abs(cde[0] - cde[1] * cde[2]) < 1e-9:
                raise ValueError(f"{f}.linear_cde: singular (c - d*e = 0)")
        return FThetaIntrinsics((w, h), shutter, _principal_point(p, f), ref, bw, fw,
                                _max_angle(p.max_angle, math.pi, f), cde)
    if which == "opencv_pinhole_param":
        p = spec.opencv_pinhole_param
        f = f"{field}.opencv_pinhole_param"
        return OpenCVPinholeIntrinsics(
            (w, h), shutter, _principal_point(p, f), _positive_focal(p, f),
            parse_floats(p.radial_coeffs, f"{f}.radial_coeffs", pad=6, error=ValueError),
            parse_floats(p.tangential_coeffs, f"{f}.tangential_coeffs", pad=2, error=ValueError),
            parse_floats(p.thin_prism_coeffs, f"{f}.thin_prism_coeffs", pad=4, error=ValueError))
    p = spec.opencv_fisheye_param
    f = f"{field}.opencv_fisheye_param"
    return OpenCVFisheyeIntrinsics(
        (w, h), shutter, _principal_point(p, f), _positive_focal(p, f),
        parse_floats(p.radial_coeffs, f"{f}.radial_coeffs", pad=4, error=ValueError),
        _max_angle(p.max_angle, math.pi / 2, f))


def lidar_return(points: np.ndarray, intensities: np.ndarray, ring_ids: np.ndarray,
                 repeated_fields: bool = True) -> sensorsim_pb2.LidarRenderReturn:
    """Points (N, 3) and intensities (N,) in the end-of-spin lidar frame -> LidarRenderReturn: float32
    little-endian buffers (x, y, z interleaved), `num_points`, tier4's uint16 ring-id buffer and, with
    `repeated_fields`, the same data in the repeated fields (which roughly doubles the reply)."""
    pts = np.ascontiguousarray(points, dtype="<f4").reshape(-1, 3)
    inten = np.ascontiguousarray(intensities, dtype="<f4").reshape(-1)
    rings = np.ascontiguousarray(ring_ids, dtype="<u2").reshape(-1)
    out = sensorsim_pb2.LidarRenderReturn(num_points=pts.shape[0], point_xyzs_buffer=pts.tobytes(),
                                          point_intensities_buffer=inten.tobytes(),
                                          point_ring_ids_buffer=rings.tobytes())
    if not repeated_fields:
        return out
    out.point_xyzs.extend(pts.reshape(-1).tolist())
    out.point_intensities.extend(inten.tolist())
    out.point_ring_ids.extend(rings.astype(np.uint32).tolist())
    return out
