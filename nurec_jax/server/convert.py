"""Pure conversions between NuRec's protobuf messages and nurec-jax types.

Pose convention (docs/wire.md#poses-and-quaternions): `Pose{vec, quat}` is the child -> parent transform
`p_parent = R(quat) p_child + vec`, quaternion Hamilton (w, x, y, z) by field name. NRE's helper order
`[x, y, z, qx, qy, qz, qw]` (scipy) is what `grpc_pose_to_tquat` returns.
Errors raise `ValueError` naming the offending field; the servicer maps them to INVALID_ARGUMENT.
"""

from __future__ import annotations

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
    build_intrinsics,
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
    return common_pb2.Pose(
        vec=common_pb2.Vec3(x=t[0], y=t[1], z=t[2]), quat=common_pb2.Quat(w=t[6], x=t[3], y=t[4], z=t[5])
    )


def grpc_pose_to_se3(pose: common_pb2.Pose, field: str = "pose", dtype=jnp.float32) -> jnp.ndarray:
    """Pose -> 4x4 homogeneous matrix (a JAX array)."""
    return jnp.asarray(geometry.pose7_xyzw_to_matrix(grpc_pose_to_tquat(pose, field)), dtype)


def se3_to_grpc_pose(m) -> common_pb2.Pose:
    """4x4 rigid transform -> Pose."""
    m = np.asarray(m, np.float64)
    q = geometry.matrix_to_quat_wxyz(m[:3, :3])
    return tquat_to_grpc_pose(np.concatenate([m[:3, 3], geometry.wxyz_to_xyzw(q)]))


def trajectory_to_proto(timestamps_us, transforms) -> common_pb2.Trajectory:
    return common_pb2.Trajectory(
        poses=[
            common_pb2.PoseAtTime(pose=se3_to_grpc_pose(m), timestamp_us=int(t))
            for t, m in zip(timestamps_us, transforms)
        ]
    )


def camera_spec_from_intrinsics(logical_id: str, intr) -> sensorsim_pb2.CameraSpec:
    """Scene calibration -> CameraSpec (native resolution, `logical_id` filled)."""
    w, h = intr.resolution
    spec = sensorsim_pb2.CameraSpec(
        logical_id=logical_id, resolution_w=w, resolution_h=h, shutter_type=int(intr.shutter_type)
    )
    if isinstance(intr, FThetaIntrinsics):
        spec.ftheta_param.CopyFrom(
            sensorsim_pb2.FthetaCameraParam(
                principal_point_x=intr.principal_point[0],
                principal_point_y=intr.principal_point[1],
                reference_poly=int(intr.reference_poly),
                pixeldist_to_angle_poly=list(intr.pixeldist_to_angle_poly),
                angle_to_pixeldist_poly=list(intr.angle_to_pixeldist_poly),
                max_angle=intr.max_angle,
                linear_cde=sensorsim_pb2.LinearCde(
                    linear_c=intr.linear_cde[0], linear_d=intr.linear_cde[1], linear_e=intr.linear_cde[2]
                ),
            )
        )
    elif isinstance(intr, OpenCVPinholeIntrinsics):
        spec.opencv_pinhole_param.CopyFrom(
            sensorsim_pb2.OpenCVPinholeCameraParam(
                principal_point_x=intr.principal_point[0],
                principal_point_y=intr.principal_point[1],
                focal_length_x=intr.focal_length[0],
                focal_length_y=intr.focal_length[1],
                radial_coeffs=list(intr.radial_coeffs),
                tangential_coeffs=list(intr.tangential_coeffs),
                thin_prism_coeffs=list(intr.thin_prism_coeffs),
            )
        )
    elif isinstance(intr, OpenCVFisheyeIntrinsics):
        spec.opencv_fisheye_param.CopyFrom(
            sensorsim_pb2.OpenCVFisheyeCameraParam(
                principal_point_x=intr.principal_point[0],
                principal_point_y=intr.principal_point[1],
                focal_length_x=intr.focal_length[0],
                focal_length_y=intr.focal_length[1],
                radial_coeffs=list(intr.radial_coeffs),
                max_angle=intr.max_angle,
            )
        )
    else:
        raise TypeError(f"unsupported intrinsics {type(intr).__name__}")
    return spec


def available_camera(cal: CameraCalibration) -> sensorsim_pb2.AvailableCamerasReturn.AvailableCamera:
    """`rig_to_camera` carries camera -> rig (T_sensor_rig), as NRE fills it (docs/wire.md#camera-mounts).
    `trajectory_idx` (also in the intrinsics' CameraSpec, so a copied spec names the same calibration)
    is the index of the rig trajectory the camera belongs to (NRE left both 0)."""
    spec = camera_spec_from_intrinsics(cal.logical_id, cal.intrinsics)
    spec.trajectory_idx = cal.trajectory_idx
    return sensorsim_pb2.AvailableCamerasReturn.AvailableCamera(
        intrinsics=spec,
        rig_to_camera=se3_to_grpc_pose(cal.T_sensor_rig),
        logical_id=cal.logical_id,
        trajectory_idx=cal.trajectory_idx,
    )


def _max_angle(value: float) -> float | None:
    # proto3 has no presence for doubles: 0 means unset (AlpaSim's convention).
    return None if value == 0 else value


def intrinsics_from_camera_spec(spec: sensorsim_pb2.CameraSpec, field: str = "camera_intrinsics"):
    """CameraSpec with a `camera_param` -> intrinsics at its native resolution (`metadata.build_intrinsics`,
    the validation scene files get too). Raises ValueError naming the bad field; returns None when no
    `camera_param` is set (the scene's camera is meant)."""
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
    p = getattr(spec, which)
    where = f"{field}.{which}"
    common = dict(
        resolution=(w, h), shutter=shutter, principal_point=(p.principal_point_x, p.principal_point_y), error=ValueError
    )
    if which == "ftheta_param":
        if p.reference_poly not in (1, 2):
            raise ValueError(f"{where}.reference_poly: must be PIXELDIST_TO_ANGLE or ANGLE_TO_PIXELDIST")
        cde = p.linear_cde
        return build_intrinsics(
            "ftheta",
            where,
            reference_poly=PolynomialType(int(p.reference_poly)),
            pixeldist_to_angle_poly=list(p.pixeldist_to_angle_poly),
            angle_to_pixeldist_poly=list(p.angle_to_pixeldist_poly),
            linear_cde=(cde.linear_c, cde.linear_d, cde.linear_e) if p.HasField("linear_cde") else None,
            max_angle=_max_angle(p.max_angle),
            **common,
        )
    focal = dict(focal_length=(p.focal_length_x, p.focal_length_y), focal_field="focal_length_x/focal_length_y")
    if which == "opencv_pinhole_param":
        return build_intrinsics(
            "opencv-pinhole",
            where,
            radial_coeffs=list(p.radial_coeffs),
            tangential_coeffs=list(p.tangential_coeffs),
            thin_prism_coeffs=list(p.thin_prism_coeffs),
            **focal,
            **common,
        )
    return build_intrinsics(
        "opencv-fisheye",
        where,
        radial_coeffs=list(p.radial_coeffs),
        max_angle=_max_angle(p.max_angle),
        **focal,
        **common,
    )


def lidar_return(
    points: np.ndarray, intensities: np.ndarray, ring_ids: np.ndarray, repeated_fields: bool = True
) -> sensorsim_pb2.LidarRenderReturn:
    """Points (N, 3) and intensities (N,) in the end-of-spin lidar frame -> LidarRenderReturn: float32
    little-endian buffers (x, y, z interleaved), `num_points`, tier4's uint16 ring-id buffer and, with
    `repeated_fields`, the same data in the repeated fields (which roughly doubles the reply)."""
    pts = np.ascontiguousarray(points, dtype="<f4").reshape(-1, 3)
    inten = np.ascontiguousarray(intensities, dtype="<f4").reshape(-1)
    rings = np.ascontiguousarray(ring_ids, dtype="<u2").reshape(-1)
    out = sensorsim_pb2.LidarRenderReturn(
        num_points=pts.shape[0],
        point_xyzs_buffer=pts.tobytes(),
        point_intensities_buffer=inten.tobytes(),
        point_ring_ids_buffer=rings.tobytes(),
    )
    if not repeated_fields:
        return out
    out.point_xyzs.extend(pts.reshape(-1).tolist())
    out.point_intensities.extend(inten.tolist())
    out.point_ring_ids.extend(rings.astype(np.uint32).tolist())
    return out
