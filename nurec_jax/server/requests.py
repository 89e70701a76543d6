"""Validation of render requests and their conversion into what the renderer takes (pure functions).

Everything here raises the typed errors of `nurec_jax.server.request_errors` with a message naming the field,
so the servicer can answer with the right status code before any device work is spent.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nurec_jax import cameras as camera_lib
from nurec_jax import geometry
from nurec_jax.cameras import Camera
from nurec_jax.metadata import SceneMetadata
from nurec_jax.poses import PosePair
from nurec_jax.render import ActorPoses
from nurec_jax.renderer import track_actor_poses
from nurec_jax.server import convert, images
from nurec_jax.server.request_errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, check_id, quoted

# Largest output accepted: 16384 pixels a side and 64 megapixels (a 4K frame is 8.3 MP).
MAX_SIDE = 16384
MAX_PIXELS = 64 << 20

EDITING_DISABLED_MESSAGE = (
    "Got render request with DynamicObject updates but actor editing is disabled on the server. "
    "Restart serve-grpc with --enable-editing-actors."
)


@dataclasses.dataclass(frozen=True)
class RGBJob:
    """One validated camera render.

    Attributes:
      camera: the camera model at the output resolution.
      sensor_pose: camera -> world at the exposure start and end.
      start_us, end_us: the exposure interval [start, end).
      actor_overrides: track id -> (T_start, T_end) object -> world, or None (actors follow their tracks).
      image_format, image_quality: the encoding.
      ego_mask: (rig_config_id, camera_logical_id) of the hood to composite, or None.
      logical_id, trajectory_idx: the camera the request names (it selects the scene's PPISP
        camera curve; "" for none).
    """

    camera: Camera
    sensor_pose: PosePair
    start_us: int
    end_us: int
    actor_overrides: dict[str, tuple[np.ndarray, np.ndarray]] | None
    image_format: int
    image_quality: float
    ego_mask: tuple[str, str] | None
    logical_id: str = ""
    trajectory_idx: int = 0


def _pose_matrix(pose_msg, field: str) -> np.ndarray:
    try:
        return geometry.pose7_xyzw_to_matrix(convert.grpc_pose_to_tquat(pose_msg, field))
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def pose_pair(msg, field: str, owner) -> tuple[np.ndarray, np.ndarray]:
    """A PosePair message (required) -> (T_start, T_end) 4x4 float64."""
    name = field.rsplit(".", 1)[-1]
    if not owner.HasField(name):
        raise InvalidArgument(f"{field}: missing")
    return _pose_matrix(msg.start_pose, f"{field}.start_pose"), _pose_matrix(msg.end_pose, f"{field}.end_pose")


# How far a request's sensor_pose may stray from ego_pose composed with the camera's mount when it sends
# both (float32 poses at street scale are good to well under a millimetre; a mount that differs by more
# than this is a different rig, not rounding).
EGO_POSE_TOLERANCE_M = 0.01
EGO_POSE_TOLERANCE_RAD = np.deg2rad(0.1)


def _pose_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(translation distance in metres, rotation angle in radians) between two 4x4 poses; the angle from
    atan2 of the rotation's sine and cosine parts, exact for small angles (no arccos of ~1)."""
    r = a[:3, :3].T @ b[:3, :3]
    sin = 0.5 * np.linalg.norm([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    cos = 0.5 * (np.trace(r) - 1.0)
    return float(np.linalg.norm(a[:3, 3] - b[:3, 3])), float(np.arctan2(sin, cos))


def camera_pose_pair(metadata: SceneMetadata, request, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The camera -> world poses (start, end) of an RGBRenderRequest.

    `sensor_pose` is the camera pose itself. AlpaSim's `ego_pose` (field 1013) is the rig pose: the camera
    pose is then ego_pose @ T_sensor_rig, the mount of the scene camera `camera_intrinsics.logical_id`
    names. With only ego_pose that product is rendered; with both they must agree within
    EGO_POSE_TOLERANCE_M / _RAD (INVALID_ARGUMENT naming both fields otherwise) and sensor_pose is used."""
    has_sensor, has_ego = request.HasField("sensor_pose"), request.HasField("ego_pose")
    if not has_ego:
        return pose_pair(request.sensor_pose, f"{prefix}sensor_pose", request)
    ego = pose_pair(request.ego_pose, f"{prefix}ego_pose", request)
    spec = request.camera_intrinsics
    if spec.logical_id not in metadata.cameras:  # every logical id of the scene, whatever its trajectory
        if has_sensor:  # nothing to compare against: a novel camera on no known mount
            return pose_pair(request.sensor_pose, f"{prefix}sensor_pose", request)
        raise InvalidArgument(
            f"{prefix}ego_pose: without a sensor_pose the camera pose is ego_pose composed with the camera's "
            f"mount, and camera_intrinsics.logical_id {quoted(spec.logical_id)} names no camera of scene "
            f"{quoted(metadata.scene_id)}; send sensor_pose for a camera the scene does not have"
        )
    mount = scene_camera(metadata, spec.logical_id, int(spec.trajectory_idx), f"{prefix}camera_intrinsics")
    derived = tuple(t @ mount.T_sensor_rig for t in ego)
    if not has_sensor:
        return derived
    given = pose_pair(request.sensor_pose, f"{prefix}sensor_pose", request)
    for which, g, d in (("start_pose", given[0], derived[0]), ("end_pose", given[1], derived[1])):
        dist, angle = _pose_gap(g, d)
        if dist > EGO_POSE_TOLERANCE_M or angle > EGO_POSE_TOLERANCE_RAD:
            raise InvalidArgument(
                f"{prefix}sensor_pose.{which} and {prefix}ego_pose.{which} disagree: sensor_pose is "
                f"{dist * 100:.2f} cm and {np.rad2deg(angle):.3f} deg from ego_pose composed with camera "
                f"{quoted(spec.logical_id)}'s mount (tolerance {EGO_POSE_TOLERANCE_M * 100:g} cm, "
                f"{np.rad2deg(EGO_POSE_TOLERANCE_RAD):g} deg); send one of them, or both consistent"
            )
    return given


def _merged_ranges(metadata: SceneMetadata) -> list[tuple[int, int]]:
    """The half-open [first, last + 1) ranges of every rig trajectory, overlapping ones joined."""
    ranges = sorted((first, last + 1) for first, last in (t.time_range_us for t in metadata.trajectories))
    merged = [ranges[0]]
    for a, b in ranges[1:]:
        if a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def check_interval(metadata: SceneMetadata, start_us: int, end_us: int, prefix: str = "") -> None:
    """[start, end) must be non-empty and inside [first rig timestamp, last + 1) (docs/wire.md#time-interval) of a
    rig trajectory: with several trajectories, inside the union of their ranges (a request need not
    name its trajectory: NRE clients never set trajectory_idx).

    A scene without an ego trajectory (a plain Gaussian file) accepts any non-empty interval."""
    if end_us <= start_us:
        raise OutOfRange(
            f"{prefix}frame_end_us ({end_us}) must be greater than {prefix}frame_start_us ({start_us}); "
            f"the interval is half-open: to render at an instant t use [t, t+1)"
        )
    if metadata.trajectory is None:
        return
    ranges = _merged_ranges(metadata)
    if not any(a <= start_us and end_us <= b for a, b in ranges):
        shown = ", ".join(f"[{a}, {b})" for a, b in ranges)
        raise OutOfRange(
            f"{prefix}[frame_start_us, frame_end_us) = [{start_us}, {end_us}) is outside the time range of scene "
            f"{quoted(metadata.scene_id)}: {shown}; to render at an instant t use [t, t+1)"
        )


def scene_camera(metadata: SceneMetadata, logical_id: str, trajectory_idx: int, field: str):
    """The calibration a CameraSpec names: `logical_id` in trajectory `trajectory_idx`. Index 0 (the
    proto default: NRE clients never set it) also finds a camera that only one other trajectory holds."""
    check_id(logical_id, f"{field}.logical_id")
    matches = [c for c in metadata.camera_list if c.logical_id == logical_id]
    if not matches:
        raise NotFound(
            f"{field}.logical_id: camera {quoted(logical_id)} is not in scene {quoted(metadata.scene_id)} "
            f"(cameras: {', '.join(metadata.cameras) or 'none'}); send full intrinsics for a "
            f"novel camera"
        )
    for cal in matches:
        if cal.trajectory_idx == trajectory_idx:
            return cal
    held = sorted({c.trajectory_idx for c in matches})
    if trajectory_idx == 0 and len(held) == 1:
        return matches[0]
    raise InvalidArgument(
        f"{field}.trajectory_idx: camera {quoted(logical_id)} is not in trajectory {trajectory_idx} "
        f"of scene {quoted(metadata.scene_id)}; it is in trajectories {held}"
    )


# Bounded work (nurec-jax): the default of --max-output-pixels (ServerOptions.max_output_pixels); a
# 3848x2168 camera (8.3 MP) fits with 50 % to spare.
DEFAULT_MAX_OUTPUT_PIXELS = 12 << 20


def check_output_pixels(
    out_w: int,
    out_h: int,
    req_w: int,
    req_h: int,
    native: tuple[int, int],
    prefix: str = "",
    limit: int = DEFAULT_MAX_OUTPUT_PIXELS,
) -> None:
    """Refuses an output (after NuRec's resolution rule) above `limit` pixels (the server's
    --max-output-pixels) before anything compiles: every new size is a compile, and its time and memory
    grow with the pixel count. INVALID_ARGUMENT: the same request can never succeed on this server."""
    if out_w * out_h > limit:
        raise InvalidArgument(
            f"{prefix}resolution_w/resolution_h: {req_w}x{req_h} gives an output of {out_w}x{out_h} "
            f"({out_w * out_h} pixels) for a {native[0]}x{native[1]} camera (NuRec keeps the native aspect); "
            f"this server renders at most {limit} pixels (--max-output-pixels)"
        )


def request_camera(
    metadata: SceneMetadata,
    spec,
    req_w: int,
    req_h: int,
    prefix: str = "",
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
) -> Camera:
    """The camera of a request at NuRec's output resolution.

    With a `camera_param` the request's own intrinsics are used (a novel camera may carry any
    logical_id); without one, `logical_id` must name a camera of the scene."""
    field = f"{prefix}camera_intrinsics"
    check_id(spec.logical_id, f"{field}.logical_id")
    try:
        intr = convert.intrinsics_from_camera_spec(spec, field)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    traj_idx = int(spec.trajectory_idx)
    n_traj = len(metadata.trajectories)
    if traj_idx and traj_idx >= n_traj:
        raise InvalidArgument(
            f"{field}.trajectory_idx: {traj_idx} names no rig trajectory of scene "
            f"{quoted(metadata.scene_id)} (it has {n_traj}" + (f": 0..{n_traj - 1})" if n_traj else ")")
        )
    if intr is None:
        if not spec.logical_id:
            raise InvalidArgument(f"{field}: neither a camera_param nor a logical_id is set")
        intr = scene_camera(metadata, spec.logical_id, traj_idx, field).intrinsics
    if req_w < 0 or req_h < 0:
        raise InvalidArgument(f"{prefix}resolution_w/resolution_h: negative")
    if req_w == 0 and req_h == 0:
        raise InvalidArgument(f"{prefix}resolution_w/resolution_h: both are 0; ask for a height, a width or both")
    if req_w > MAX_SIDE or req_h > MAX_SIDE:
        raise InvalidArgument(f"{prefix}resolution_w/resolution_h: {req_w}x{req_h} exceeds {MAX_SIDE} pixels a side")
    native_w, native_h = intr.resolution
    out_w, out_h, _ = camera_lib.output_resolution(native_w, native_h, req_w, req_h)
    if out_w < 1 or out_h < 1 or out_w > MAX_SIDE or out_h > MAX_SIDE or out_w * out_h > MAX_PIXELS:
        raise InvalidArgument(
            f"{prefix}resolution_w/resolution_h: {req_w}x{req_h} gives an output of {out_w}x{out_h} for a "
            f"{native_w}x{native_h} camera (NuRec keeps the native aspect); it must be 1..{MAX_SIDE} a side "
            f"and at most {MAX_PIXELS} pixels"
        )
    check_output_pixels(out_w, out_h, req_w, req_h, (native_w, native_h), prefix, max_output_pixels)
    return camera_lib.camera_at_resolution(camera_lib.camera_from_intrinsics(intr), req_w, req_h)


def actor_overrides(metadata: SceneMetadata, objects, editing_enabled: bool, prefix: str = ""):
    """`dynamic_objects` -> {track id: (T_start, T_end)} or None when the list is empty (docs/wire.md#dynamic-objects)."""
    if not objects:
        return None
    if not editing_enabled:
        raise InvalidArgument(EDITING_DISABLED_MESSAGE)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, obj in enumerate(objects):
        field = f"{prefix}dynamic_objects[{i}]"
        check_id(obj.track_id, f"{field}.track_id")
        tid = obj.track_id.split("@")[0]
        if tid not in metadata.tracks:
            raise InvalidArgument(
                f"{field}.track_id: {quoted(obj.track_id)} is not a track of scene {quoted(metadata.scene_id)}"
            )
        if tid in out:
            raise InvalidArgument(f"{field}.track_id: {quoted(obj.track_id)} is listed twice")
        out[tid] = pose_pair(obj.pose_pair, f"{field}.pose_pair", obj)
    return out


def prepare_rgb(
    metadata: SceneMetadata,
    request,
    *,
    editing_enabled: bool,
    prefix: str = "",
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
) -> RGBJob:
    """Validates an RGBRenderRequest against a scene; raises typed errors naming the field. Outputs above
    `max_output_pixels` (the server's --max-output-pixels) are refused."""
    try:
        images.validate_format(request.image_format, request.image_quality, prefix.rstrip("."))
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    camera = request_camera(
        metadata,
        request.camera_intrinsics,
        int(request.resolution_w),
        int(request.resolution_h),
        prefix,
        max_output_pixels,
    )
    start_us, end_us = int(request.frame_start_us), int(request.frame_end_us)
    check_interval(metadata, start_us, end_us, prefix)
    t_start, t_end = camera_pose_pair(metadata, request, prefix)
    overrides = actor_overrides(metadata, request.dynamic_objects, editing_enabled, prefix)
    ego = None
    if request.insert_ego_mask:
        if not request.HasField("ego_mask_id") or not request.ego_mask_id.rig_config_id:
            raise InvalidArgument(f"{prefix}ego_mask_id: required when insert_ego_mask is set")
        check_id(request.ego_mask_id.rig_config_id, f"{prefix}ego_mask_id.rig_config_id")
        check_id(request.ego_mask_id.camera_logical_id, f"{prefix}ego_mask_id.camera_logical_id")
        cam_id = request.ego_mask_id.camera_logical_id or request.camera_intrinsics.logical_id
        ego = (request.ego_mask_id.rig_config_id, cam_id)
    pose = PosePair.from_matrices(t_start.astype(np.float32), t_end.astype(np.float32))
    return RGBJob(
        camera,
        pose,
        start_us,
        end_us,
        overrides,
        int(request.image_format),
        float(request.image_quality),
        ego,
        request.camera_intrinsics.logical_id,
        int(request.camera_intrinsics.trajectory_idx),
    )


def job_actor_poses(metadata: SceneMetadata, track_ids: tuple[str, ...], job) -> ActorPoses:
    """Actor poses for a job: recorded tracks, or (with overrides) the listed actors at the given poses,
    unlisted controllable actors removed and non-controllable ones as recorded (docs/wire.md#dynamic-objects)."""
    poses = track_actor_poses(metadata, track_ids, job.start_us, job.end_us, job.actor_overrides)
    if job.actor_overrides is None or not track_ids:
        return poses
    keep = np.asarray(
        [
            tid in job.actor_overrides or not (tid in metadata.tracks and metadata.tracks[tid].is_controllable)
            for tid in track_ids
        ]
    )
    return ActorPoses(poses.poses, poses.visible & keep)


# ------------------------------------------------------------------------------------------------
# Lidar

DEFAULT_OPACITY_THRESHOLD = 0.8  # NRE's artifact default (docs/wire.md#lidar-requests)
DEFAULT_DISTANCE_FILTER_THRESHOLD = 0.02


@dataclasses.dataclass(frozen=True)
class LidarJob:
    model: object  # nurec_jax.lidar_models.LidarModel
    sensor_pose: PosePair
    start_us: int
    end_us: int
    actor_overrides: dict[str, tuple[np.ndarray, np.ndarray]] | None
    opacity_threshold: float
    distance_filter: float | None


def lidar_model_for(metadata: SceneMetadata, lidar_type: int, prefix: str = ""):
    """The lidar a request renders: the scene's own lidar of that device type, or (for the default
    PANDAR128, what clients that ignore the field send) the scene's first lidar as NRE does, else
    the device's table (nurec_jax.lidar_models)."""
    from nurec_jax import lidar_models
    from nurec_jax._proto import sensorsim_pb2

    try:
        name = sensorsim_pb2.LidarDeviceType.Name(lidar_type)
    except ValueError:
        raise InvalidArgument(f"{prefix}lidar_config.lidar_type: unknown value {lidar_type}") from None
    cals = list(metadata.lidar_list)
    chosen = next((c for c in cals if str(c.parameters.get("device", "")).upper() == name), None)
    if chosen is None and lidar_type == sensorsim_pb2.PANDAR128 and cals:
        chosen = next((c for c in cals if c.model), cals[0])
    if chosen is not None and not chosen.model:
        raise FailedPrecondition(
            f"{prefix}lidar_config.lidar_type: {name} renders scene lidar {chosen.key!r}, which has no lidar "
            f"model in rig_trajectories.json (lidar_model is null); this scene cannot render it"
        )
    if chosen is not None:
        try:
            return lidar_models.from_calibration(chosen)
        except ValueError:
            pass  # an unusable calibration: the device table still renders
    return lidar_models.DEVICES[name]()


def prepare_lidar(metadata: SceneMetadata, request, *, editing_enabled: bool, prefix: str = "") -> LidarJob:
    """Validates a LidarRenderRequest; raises typed errors naming the field."""
    model = lidar_model_for(metadata, int(request.lidar_config.lidar_type), prefix)
    start_us, end_us = int(request.frame_start_us), int(request.frame_end_us)
    check_interval(metadata, start_us, end_us, prefix)
    t_start, t_end = pose_pair(request.sensor_pose, f"{prefix}sensor_pose", request)
    overrides = actor_overrides(metadata, request.dynamic_objects, editing_enabled, prefix)
    f = request.render_filter
    opacity = DEFAULT_OPACITY_THRESHOLD
    if f.HasField("opacity_threshold"):
        opacity = float(f.opacity_threshold)
        if not 0.0 <= opacity < 1.0:
            raise InvalidArgument(f"{prefix}render_filter.opacity_threshold: must be in [0, 1), got {opacity}")
    if f.HasField("raydrop_threshold") and not 0.0 <= f.raydrop_threshold <= 1.0:
        raise InvalidArgument(f"{prefix}render_filter.raydrop_threshold: must be in [0, 1], got {f.raydrop_threshold}")
    dist = None
    if f.HasField("enable_distance_filter") and f.enable_distance_filter:
        dist = (
            float(f.distance_filter_threshold)
            if f.HasField("distance_filter_threshold")
            else DEFAULT_DISTANCE_FILTER_THRESHOLD
        )
        if not 0.0 <= dist <= 1.0:
            raise InvalidArgument(f"{prefix}render_filter.distance_filter_threshold: must be in [0, 1], got {dist}")
    pose = PosePair.from_matrices(t_start.astype(np.float32), t_end.astype(np.float32))
    return LidarJob(model, pose, start_us, end_us, overrides, opacity, dist)
