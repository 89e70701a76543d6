"""`render-grpc`: render a scene's recorded ego drive through a running serve-grpc.

    render-grpc --artifact-path=scene.usdz --output-dir=out --camera-id=camera_front_wide_120fov --height=300

Walks the ego trajectory (every `--frame-step`-th recorded frame of each camera), asks the server for
one image per frame, writes them under `<output-dir>/<camera>/`, plus `timestamps.json`,
`render_grpc_cli_args.json` and an MP4 and a GIF per camera, playing at the recorded rate. With
`--lidar`, each spin becomes a .ply (or .bin) and a bird's-eye-view PNG under `<output-dir>/<lidar>/`.
The first request of each camera (and of the lidar) runs alone: the server compiles a renderer for a
new size then, which takes a while on a CPU.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import operator
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

# gRPC's own log would repeat every failed TLS handshake while render-grpc waits for the server; its
# errors still show, and render-grpc says in one line why it gave up.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc
import numpy as np
from absl import app, flags

from nurec_jax.cli import _flags, _help, _progress, _video
from nurec_jax.cli.scene_errors import one_line_scene_errors

_ARTIFACT = flags.DEFINE_string("artifact_path", None, "The scene .usdz (its id and recorded frames are read).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where images are written.")
_HOST = flags.DEFINE_string("host", "localhost", "Server host.")
_PORT = flags.DEFINE_integer("port", 8080, "Server port.")
_TLS_CA = flags.DEFINE_string("tls_ca_file", None, "Connect with TLS, verifying the server against this PEM CA.")
_TLS_CERT = flags.DEFINE_string(
    "tls_cert_file", None, "Client certificate (PEM) for an mTLS server; connects with TLS (needs --tls-key-file)."
)
_TLS_KEY = flags.DEFINE_string("tls_key_file", None, "Private key (PEM, unencrypted) of --tls-cert-file.")
_TLS_NAME = flags.DEFINE_string(
    "tls_server_name",
    None,
    "Name to check the server certificate against instead of --host (e.g. localhost when connecting by address).",
)
_TOKEN_FILE = flags.DEFINE_string(
    "auth_token_file", None, "File holding the server's token, sent as 'authorization: Bearer <token>' on every call."
)
_HEIGHT = flags.DEFINE_integer(
    "height", 300, "Output height, pixels (width follows the camera's aspect, NuRec's rule)."
)
_CAMERA = flags.DEFINE_list("camera_id", ["camera_front_wide_120fov"], "Camera logical id(s), comma separated.")
_FORMAT = flags.DEFINE_enum("image_format", "jpeg", ["png", "jpeg"], "Image format.")
_FRAME_STEP = flags.DEFINE_integer("frame_step", 1, "Render every n-th recorded frame.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "Render at most this many frames per camera.")
_DISABLE_RS = flags.DEFINE_boolean("disable_rolling_shutter", False, "Ask for a global shutter.")
_DEMO_ACTORS = flags.DEFINE_boolean(
    "demo_actor_transform",
    False,
    "Move the scene's controllable actors (2 m to their left, yawed 15 degrees); the server needs "
    "--enable-editing-actors.",
)
_SHUTDOWN = flags.DEFINE_boolean("shutdown_server_on_completion", False, "Call shut_down when done.")
_EDIT_ASSETS = flags.DEFINE_string(
    "edit_assets",
    None,
    "Actor edits applied before rendering and undone (restore_model_parameters) after: an "
    "EditAssetsRequest as JSON (inline, or a path to a .json file), e.g. "
    '\'{"replace": [{"original_id": "3", "replacement_id": "box_truck"}]}\' (scene_id is filled in).',
)
_RIG_NAME = flags.DEFINE_string("rig_name", None, "Ego-hood rig id (a directory of the server's --egocar-hood-dir).")
_FRAME_NAMING = flags.DEFINE_enum(
    "frame_naming", "frame-end-timestamp", ["frame-end-timestamp", "contiguous-output-index"], "Image file names."
)
_SEQUENTIAL = flags.DEFINE_boolean("sequential", False, "One request at a time.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 4, "Requests in flight at once (unless --sequential).")
_VIDEO = flags.DEFINE_list(
    "video_format",
    list(_video.FORMATS),
    "Animations of each camera's frames, comma separated: mp4 (H.264), gif, or none.",
)
_FPS = flags.DEFINE_float(
    "video_fps",
    None,
    "Animation frame rate; default: the rate the frames were recorded at, "
    "i.e. one over (recorded frame interval x --frame-step): 1/3 fps for every 30th frame of a "
    "10 Hz camera.",
)
_CONNECT_TIMEOUT = flags.DEFINE_float(
    "connect_timeout_s",
    30.0,
    "How long to wait for the server to answer at start (it may still be starting) before giving up, seconds.",
)
_TIMEOUT = flags.DEFINE_float(
    "timeout_s", 600.0, "Per-request deadline, seconds (the first request of a new size includes the server's compile)."
)
_SCENE_URL = flags.DEFINE_string(
    "scene_url",
    None,
    "When the server does not serve the scene yet: an http(s) URL "
    "it downloads the scene from (sent as x-nre-scene-url / x-nre-scene-id).",
)
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar on a terminal (plain lines elsewhere).")
_LIDAR = flags.DEFINE_boolean("lidar", False, "Also render lidar spins (a .ply and a bird's-eye-view PNG each).")
_LIDAR_ID = flags.DEFINE_string(
    "lidar_id", None, "Scene lidar whose mount (and spin windows) to use; default: the scene's first lidar."
)
_LIDAR_TYPE = flags.DEFINE_enum("lidar_type", "PANDAR128", ["PANDAR128", "AT128"], "LidarSpec.lidar_type.")
_LIDAR_FORMAT = flags.DEFINE_enum(
    "lidar_format", "ply", ["ply", "bin"], "ply, or bin (N x 4 float32: x, y, z, intensity)."
)
_LIDAR_STEP = flags.DEFINE_integer("lidar_frame_step", None, "Every n-th spin (default: --frame-step).")
_LIDAR_RAYDROP = flags.DEFINE_float("lidar_raydrop_threshold", 0.5, "render_filter.raydrop_threshold.")
_LIDAR_OPACITY = flags.DEFINE_float("lidar_opacity_threshold", 0.0, "render_filter.opacity_threshold.")
_LIDAR_DFILTER = flags.DEFINE_boolean("lidar_distance_filter", False, "render_filter.enable_distance_filter.")
_LIDAR_DFILTER_T = flags.DEFINE_float(
    "lidar_distance_filter_threshold", 0.02, "render_filter.distance_filter_threshold."
)
_BEV_COLOR = flags.DEFINE_enum(
    "lidar_bev_color",
    "height",
    ["height", "intensity"],
    "BEV colouring: height -2.5 .. +3 m about the sensor, or intensity 0 .. 1.",
)


def _pose_to_matrix(pose_msg) -> np.ndarray:
    from nurec_jax import geometry
    from nurec_jax.server import convert

    return geometry.pose7_xyzw_to_matrix(convert.grpc_pose_to_tquat(pose_msg))


def _trajectory(traj_msg) -> tuple[np.ndarray, np.ndarray]:
    ts = np.asarray([p.timestamp_us for p in traj_msg.poses], np.int64)
    mats = np.stack([_pose_to_matrix(p.pose) for p in traj_msg.poses]) if len(ts) else np.zeros((0, 4, 4))
    return ts, mats


def _demo_tracks(stub, sensorsim_pb2, scene_id, metadata):
    """The scene's controllable tracks as (id, timestamps, poses), fetched once."""
    objs = stub.get_dynamic_objects(
        sensorsim_pb2.AvailableDynamicObjectsRequest(scene_id=scene_id), metadata=metadata, timeout=_TIMEOUT.value
    )
    return [(track.id, *_trajectory(track.trajectory)) for track in objs.dynamic_objects]


def _demo_actors(tracks, sensorsim_pb2, start_us, end_us):
    """Every track present over [start, end), moved 2 m to its left and yawed 15 degrees."""
    from nurec_jax import geometry
    from nurec_jax.server import convert

    out = []
    yaw = np.deg2rad(15.0)
    offset = geometry.make_transform(
        np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]]), np.array([0, 2.0, 0])
    )
    for track_id, ts, mats in tracks:
        if len(ts) == 0 or start_us < ts[0] or end_us > ts[-1] + 1:
            continue
        pair = [geometry.interpolate_poses(ts, mats, t) @ offset for t in (start_us, end_us)]
        out.append(
            sensorsim_pb2.DynamicObject(
                track_id=track_id,
                pose_pair=sensorsim_pb2.PosePair(
                    start_pose=convert.se3_to_grpc_pose(pair[0]), end_pose=convert.se3_to_grpc_pose(pair[1])
                ),
            )
        )
    return out


def _unreachable_line(target: str, details: str, connect_s: float, tls: bool) -> str:
    """The one line render-grpc ends with when no server answered at `target` within `connect_s`.

    `details` is gRPC's text for the last connection attempt ("failed to connect to all addresses; last
    error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused"). A plaintext
    client sees a TLS server close the socket; a TLS client sees a plaintext server fail the handshake."""
    m = re.search(r"last error: \w+: (?:ipv4:|ipv6:|unix:)?\S+?: (.*)$", details)
    reason = (m.group(1) if m else details).removesuffix(": OK").strip()
    low = reason.lower()
    hint = "start serve-grpc there, or pass --host / --port"
    if "wrong_version_number" in low:
        reason, hint = "TLS handshake failed", "the server is plaintext: leave out the --tls-* flags"
    elif "certificate_verify_failed" in low or "verify failed" in low:
        reason, hint = "TLS handshake failed", "the server's certificate is not signed by --tls-ca-file's CA"
    elif "handshake" in low:
        reason, hint = "TLS handshake failed", "check the --tls-* flags (a plaintext server needs none)"
    elif "socket closed" in low and not tls:
        reason, hint = "the server closed the connection", "a server with TLS needs --tls-ca-file"
    elif "refused" in low:
        reason = "connection refused"
    return f"render-grpc: no server answered at {target} within {connect_s:g} s ({reason}); {hint}"


def _connect(stub, target: str, tls: bool):
    """Waits up to --connect-timeout-s for the server's get_version; (version, None) or (None, error line)."""
    from nurec_jax._proto import common_pb2

    print(f"render-grpc: waiting for server at {target} (up to {_CONNECT_TIMEOUT.value:g} s)", flush=True)
    try:
        return stub.get_version(common_pb2.Empty(), wait_for_ready=True, timeout=_CONNECT_TIMEOUT.value), None
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return None, f"render-grpc: cannot reach the server at {target}: {e.code().name} {e.details()}"
    try:  # one more try without waiting: its error says why the channel never became ready
        return stub.get_version(common_pb2.Empty(), timeout=5.0), None
    except grpc.RpcError as e:
        return None, _unreachable_line(target, e.details() or e.code().name, _CONNECT_TIMEOUT.value, tls)


def _output_size(spec, height: int) -> tuple[int, int]:
    """(width, height) the server renders a camera at for render-grpc's request (NuRec's size rule)."""
    from nurec_jax import cameras

    if spec.resolution_w <= 0 or spec.resolution_h <= 0:
        return 0, height
    w, h, _ = cameras.output_resolution(spec.resolution_w, spec.resolution_h, 1, height)
    return w, h


# --------------------------------------------------------------------------------------------
# Plan: the flags' values and the server's answers -> the requests to send and the files they make


@dataclasses.dataclass(frozen=True)
class Options:
    """The flags' values that shape the jobs, how they are sent and what is written (named as the flags).

    The defaults are the flags' defaults, so a test names only what it changes; `from_flags` reads them all.
    """

    output_dir: str
    camera_id: tuple[str, ...] = tuple(_CAMERA.default)
    height: int = _HEIGHT.default
    image_format: str = _FORMAT.default
    frame_step: int = _FRAME_STEP.default
    max_frames: int | None = _MAX_FRAMES.default
    frame_naming: str = _FRAME_NAMING.default
    disable_rolling_shutter: bool = _DISABLE_RS.default
    demo_actor_transform: bool = _DEMO_ACTORS.default
    rig_name: str | None = _RIG_NAME.default
    lidar: bool = _LIDAR.default
    lidar_id: str | None = _LIDAR_ID.default
    lidar_type: str = _LIDAR_TYPE.default
    lidar_format: str = _LIDAR_FORMAT.default
    lidar_frame_step: int | None = _LIDAR_STEP.default
    lidar_raydrop_threshold: float = _LIDAR_RAYDROP.default
    lidar_opacity_threshold: float = _LIDAR_OPACITY.default
    lidar_distance_filter: bool = _LIDAR_DFILTER.default
    lidar_distance_filter_threshold: float = _LIDAR_DFILTER_T.default
    lidar_bev_color: str = _BEV_COLOR.default
    sequential: bool = _SEQUENTIAL.default
    concurrency: int = _CONCURRENCY.default
    timeout_s: float = _TIMEOUT.default
    progress: bool = _PROGRESS.default
    video_format: tuple[str, ...] = tuple(_VIDEO.default)
    video_fps: float | None = _FPS.default

    @classmethod
    def from_flags(cls) -> Options:
        """The parsed flags' values (lists as tuples)."""
        values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @property
    def workers(self) -> int:
        """Requests in flight at once: 1 with --sequential, else --concurrency."""
        return 1 if self.sequential else max(1, self.concurrency)


@dataclasses.dataclass(frozen=True)
class Answers:
    """What the server said about the scene: the inputs of `plan_jobs` besides the flags and the file.

    Attributes:
      cameras: get_available_cameras' AvailableCamerasReturn.
      trajectories: get_available_trajectories' AvailableTrajectoriesReturn.
      ego_masks: get_available_ego_masks' AvailableEgoMasksReturn.
    """

    cameras: Any
    trajectories: Any
    ego_masks: Any


@dataclasses.dataclass(frozen=True)
class Sensor:
    """A camera or lidar the plan walks.

    Attributes:
      id: logical id; its files go to `<output-dir>/<id>/`.
      kind: "camera" or "lidar" (only cameras get animations).
      directory: `<output-dir>/<id>`.
      fps: frames per second its frames were recorded at (cameras; None when unknown or for the lidar).
      compiles: what the server compiles for its first request ("42x24 images", "the AT128 lidar pass").
      why: why that first request compiles ("first request of this size").
      unit: what one job renders: "frame" or "spin".
    """

    id: str
    kind: Literal["camera", "lidar"]
    directory: str
    fps: float | None
    compiles: str
    why: str
    unit: str


@dataclasses.dataclass(frozen=True)
class Job:
    """One request to send and the file(s) its reply becomes.

    Attributes:
      sensor: the camera or lidar id.
      index: position in that sensor's walk, from 0.
      start_us, end_us: the frame's (or spin's) window, clipped to the trajectory.
      request: the RGBRenderRequest or LidarRenderRequest.
      path: the image (.png / .jpeg) or point cloud (.ply / .bin) the reply is written to.
      bev_path: the lidar's bird's-eye-view PNG; None for a camera.
    """

    sensor: str
    index: int
    start_us: int
    end_us: int
    request: Any
    path: str
    bev_path: str | None = None

    @property
    def is_lidar(self) -> bool:
        return self.bev_path is not None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything render-grpc will ask the server for.

    Attributes:
      output_dir: --output-dir.
      sensors: the cameras in --camera-id order, then the lidar (with --lidar); timestamps.json's order.
      jobs: each camera's walk in turn, then the lidar's.
    """

    output_dir: str
    sensors: tuple[Sensor, ...]
    jobs: tuple[Job, ...]

    def firsts_and_rest(self) -> tuple[dict[str, Job], dict[str, list[Job]]]:
        """(sensor -> its first job, sensor -> its other jobs), sensors in job order.

        The first job of each sensor is sent before that sensor's others: the server compiles for a size
        (or lidar pass) it has not rendered yet during that request, and the others would only queue
        behind it."""
        firsts: dict[str, Job] = {}
        rest: dict[str, list[Job]] = collections.defaultdict(list)
        for job in self.jobs:
            if job.sensor in firsts:
                rest[job.sensor].append(job)
            else:
                firsts[job.sensor] = job
        return firsts, dict(rest)


class PlanError(ValueError):
    """The flags ask for something the scene lacks (render-grpc prints it and exits with status 1)."""


def check_cameras(camera_ids: Sequence[str], answers: Answers) -> dict:
    """Logical id -> the server's AvailableCamera for it (the first calibration of each id, one per
    trajectory). Raises PlanError for a camera the scene lacks, or a scene without an ego trajectory."""
    by_id = {}
    for c in answers.cameras.available_cameras:
        by_id.setdefault(c.logical_id, c)
    unknown = [c for c in camera_ids if c not in by_id]
    if unknown:
        raise PlanError(f"unknown camera(s) {unknown}; the scene has {sorted(by_id)}")
    if not answers.trajectories.available_trajectories:
        raise PlanError("the scene has no ego trajectory to walk")
    return by_id


def _file_name(options: Options, index: int, end_us: int) -> str:
    """A frame's file name without extension (--frame-naming)."""
    return f"{end_us}" if options.frame_naming == "frame-end-timestamp" else f"{index:06d}"


def _pose_pair(rig_ts, rig_mats, sensor_to_rig, s_us: int, e_us: int):
    """PosePair of the sensor at the window's start and end, along the rig trajectory."""
    from nurec_jax import geometry
    from nurec_jax._proto import sensorsim_pb2
    from nurec_jax.server import convert

    poses = [geometry.interpolate_poses(rig_ts, rig_mats, t) @ sensor_to_rig for t in (s_us, e_us)]
    return sensorsim_pb2.PosePair(
        start_pose=convert.se3_to_grpc_pose(poses[0]), end_pose=convert.se3_to_grpc_pose(poses[1])
    )


def _camera_walk(options, scene_meta, cam, rig, hoods, demo_tracks) -> tuple[Sensor, list[Job]]:
    """Camera `cam` (an AvailableCamera) along `rig` (timestamps, poses): its Sensor and jobs."""
    from nurec_jax._proto import sensorsim_pb2

    cam_id, (rig_ts, rig_mats) = cam.logical_id, rig
    spec = sensorsim_pb2.CameraSpec()
    spec.CopyFrom(cam.intrinsics)
    if options.disable_rolling_shutter:
        spec.shutter_type = sensorsim_pb2.GLOBAL
    rig_to_cam = _pose_to_matrix(cam.rig_to_camera)  # camera -> rig (docs/wire.md#camera-mounts)
    try:
        cal = scene_meta.camera(cam_id, cam.trajectory_idx)
    except KeyError:
        cal = scene_meta.cameras.get(cam_id)
    if cal is not None and len(cal.frame_timestamps_us):
        windows = [(int(s), int(e)) for s, e in cal.frame_timestamps_us]
    else:
        windows = [(int(t), int(t) + 1) for t in rig_ts]
    windows = windows[:: options.frame_step]
    fps = _video.implied_fps([e for _, e in windows])
    w, h = _output_size(cam.intrinsics, options.height)
    directory = os.path.join(options.output_dir, cam_id)
    compiles = f"{w}x{h} images" if w else f"images {h} high"
    sensor = Sensor(cam_id, "camera", directory, fps, compiles, why="first request of this size", unit="frame")
    ext = "png" if options.image_format == "png" else "jpeg"
    jobs = []
    for index, (s_us, e_us) in enumerate(windows[: options.max_frames]):
        s_us, e_us = max(s_us, int(rig_ts[0])), min(e_us, int(rig_ts[-1]) + 1)
        req = sensorsim_pb2.RGBRenderRequest(
            scene_id=scene_meta.scene_id,
            resolution_h=options.height,
            resolution_w=1,
            camera_intrinsics=spec,
            frame_start_us=s_us,
            frame_end_us=e_us,
            sensor_pose=_pose_pair(rig_ts, rig_mats, rig_to_cam, s_us, e_us),
            image_format=sensorsim_pb2.PNG if options.image_format == "png" else sensorsim_pb2.JPEG,
            image_quality=95.0,
        )
        if options.rig_name and (options.rig_name, cam_id) in hoods:
            req.insert_ego_mask = True
            req.ego_mask_id.CopyFrom(sensorsim_pb2.EgoMaskId(camera_logical_id=cam_id, rig_config_id=options.rig_name))
        if options.demo_actor_transform:
            req.dynamic_objects.extend(_demo_actors(demo_tracks, sensorsim_pb2, s_us, e_us))
        path = os.path.join(directory, f"{_file_name(options, index, e_us)}.{ext}")
        jobs.append(Job(cam_id, index, s_us, e_us, req, path))
    return sensor, jobs


def _lidar_walk(options, scene_meta, rig_by_idx, first_rig, demo_tracks) -> tuple[Sensor, list[Job]]:
    """The lidar (--lidar-id, else the scene's first; else a roof lidar 1.9 m up): its Sensor and spins."""
    from nurec_jax._proto import sensorsim_pb2

    lidar_cals = list(scene_meta.lidar_list)
    if options.lidar_id is not None:
        lidar_cals = [c for c in lidar_cals if c.logical_id == options.lidar_id]
        if not lidar_cals:
            raise PlanError(f"the scene has no lidar {options.lidar_id!r} ({sorted(scene_meta.lidars) or 'none'})")
    rig_ts, rig_mats = first_rig
    if lidar_cals:
        lcal = lidar_cals[0]
        lidar_id, t_lidar_rig = lcal.logical_id, lcal.T_sensor_rig
        windows = [(int(a), int(b)) for a, b in lcal.frame_timestamps_us]
        rig_ts, rig_mats = rig_by_idx.get(lcal.trajectory_idx, first_rig)
    else:  # no mount in the scene: a roof lidar 1.9 m above the rig origin, one spin per 100 ms
        lidar_id, t_lidar_rig = "lidar", np.eye(4)
        t_lidar_rig[2, 3] = 1.9
        windows = []
    if not windows:
        windows = [(int(t), int(t) + 100_000) for t in rig_ts[:-1]]
    windows = windows[:: options.lidar_frame_step or options.frame_step][: options.max_frames]
    directory = os.path.join(options.output_dir, lidar_id)
    compiles = f"the {options.lidar_type} lidar pass"
    sensor = Sensor(lidar_id, "lidar", directory, None, compiles, why="first spin of this lidar type", unit="spin")
    jobs = []
    for index, (s_us, e_us) in enumerate(windows):
        s_us, e_us = max(s_us, int(rig_ts[0])), min(e_us, int(rig_ts[-1]) + 1)
        req = sensorsim_pb2.LidarRenderRequest(
            scene_id=scene_meta.scene_id,
            lidar_config=sensorsim_pb2.LidarSpec(lidar_type=sensorsim_pb2.LidarDeviceType.Value(options.lidar_type)),
            frame_start_us=s_us,
            frame_end_us=e_us,
            sensor_pose=_pose_pair(rig_ts, rig_mats, t_lidar_rig, s_us, e_us),
            render_filter=sensorsim_pb2.LidarRenderFilter(
                raydrop_threshold=options.lidar_raydrop_threshold,
                opacity_threshold=options.lidar_opacity_threshold,
                enable_distance_filter=options.lidar_distance_filter,
                distance_filter_threshold=options.lidar_distance_filter_threshold,
            ),
        )
        if options.demo_actor_transform:
            req.dynamic_objects.extend(_demo_actors(demo_tracks, sensorsim_pb2, s_us, e_us))
        name = os.path.join(directory, _file_name(options, index, e_us))
        jobs.append(Job(lidar_id, index, s_us, e_us, req, f"{name}.{options.lidar_format}", f"{name}_bev.png"))
    return sensor, jobs


def plan_jobs(options: Options, scene_meta, answers: Answers, demo_tracks: Sequence = ()) -> Plan:
    """The jobs render-grpc sends, from the flags, the scene file's metadata and the server's answers.

    Pure: no calls, no files. Each camera walks every `frame_step`-th recorded frame of the trajectory it
    belongs to (AvailableCamera.trajectory_idx), at most `max_frames`; with `lidar`, the lidar walks its
    spins likewise. `demo_tracks` are `_demo_tracks`' (id, timestamps, poses), used with
    `demo_actor_transform`. Raises PlanError for a camera or lidar the scene lacks."""
    by_id = check_cameras(options.camera_id, answers)
    trajectories = answers.trajectories.available_trajectories
    rig_by_idx = {t.trajectory_idx: _trajectory(t.trajectory) for t in trajectories}
    first_rig = _trajectory(trajectories[0].trajectory)
    hoods = {
        (m.ego_mask_id.rig_config_id, m.ego_mask_id.camera_logical_id) for m in answers.ego_masks.ego_mask_metadata
    }
    sensors: dict[str, Sensor] = {}
    jobs: list[Job] = []
    for cam_id in options.camera_id:
        cam = by_id[cam_id]
        rig = rig_by_idx.get(cam.trajectory_idx, first_rig)
        sensors[cam_id], walk = _camera_walk(options, scene_meta, cam, rig, hoods, demo_tracks)
        jobs += walk
    if options.lidar:
        sensor, walk = _lidar_walk(options, scene_meta, rig_by_idx, first_rig, demo_tracks)
        sensors[sensor.id] = sensor
        jobs += walk
    return Plan(options.output_dir, tuple(sensors.values()), tuple(jobs))


# --------------------------------------------------------------------------------------------
# Run: send the jobs, write each reply as it comes back


@dataclasses.dataclass(frozen=True)
class Results:
    """What `run_jobs` got back.

    Attributes:
      written: sensor id -> its jobs whose reply was written, in walk order (every sensor of the plan).
      failures: jobs whose request failed.
      seconds: wall time of the whole run.
    """

    written: Mapping[str, tuple[Job, ...]]
    failures: int
    seconds: float


def save_reply(job: Job, reply, bev_color: str = _BEV_COLOR.default) -> None:
    """Writes a render reply to `job.path`: the image bytes as they came, or the lidar's points as a .ply
    (with intensities and rings) or .bin (N x 4 float32) plus the bird's-eye-view PNG at `job.bev_path`,
    coloured by height or, with `bev_color="intensity"`, by intensity."""
    if not job.is_lidar:
        with open(job.path, "wb") as f:
            f.write(reply.image_bytes)
        return
    from nurec_jax import pointcloud

    pts = np.frombuffer(reply.point_xyzs_buffer, "<f4").reshape(-1, 3)
    inten = np.frombuffer(reply.point_intensities_buffer, "<f4")
    rings = np.frombuffer(reply.point_ring_ids_buffer, "<u2") if reply.point_ring_ids_buffer else None
    if job.path.endswith(".ply"):
        pointcloud.write_ply(job.path, pts, inten, rings)
    else:
        np.concatenate([pts, inten[:, None]], 1).astype("<f4").tofile(job.path)
    by_intensity = bev_color == "intensity"
    pointcloud.write_bev_png(
        job.bev_path,
        pts,
        inten if by_intensity else None,
        value_range=(0.0, 1.0) if by_intensity else (-2.5, 3.0),
        value_label="intensity" if by_intensity else "height (m)",
    )


def run_jobs(
    stub,
    plan: Plan,
    *,
    save: Callable[[Job, Any], None] = save_reply,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = _TIMEOUT.default,
    workers: int = 1,
    bar: bool = True,
) -> Results:
    """Sends every job of `plan` on `workers` threads and calls `save(job, reply)` for each reply.

    Creates each sensor's directory first. The first job of each sensor runs before that sensor's others
    (`Plan.firsts_and_rest`). Progress (a bar on a terminal with `bar`, else one line per job) and the
    "compiling ..." notes go to stderr; a failed request is counted and named there, and the rest go on."""
    sensors = {s.id: s for s in plan.sensors}
    counts = collections.Counter(job.sensor for job in plan.jobs)
    firsts, rest = plan.firsts_and_rest()
    written: dict[str, list[Job]] = {s.id: [] for s in plan.sensors}
    for sensor in plan.sensors:
        os.makedirs(sensor.directory, exist_ok=True)

    def label(job) -> str:
        return f"{job.sensor} {sensors[job.sensor].unit} {job.index + 1}/{counts[job.sensor]}"

    def timed(job) -> float:
        if firsts[job.sensor] is job:
            sensor = sensors[job.sensor]
            progress.say(
                f"{job.sensor}: compiling {sensor.compiles} on the server unless it already has ({sensor.why})"
            )
        progress.started(label(job))
        t0 = time.perf_counter()
        render = stub.render_lidar if job.is_lidar else stub.render_rgb
        save(job, render(job.request, metadata=metadata, timeout=timeout, wait_for_ready=True))
        return time.perf_counter() - t0

    failures = 0
    start = time.perf_counter()
    with (
        _progress.Progress(len(plan.jobs), bar=bar) as progress,
        concurrent.futures.ThreadPoolExecutor(workers) as pool,
    ):
        pending = {pool.submit(timed, job): job for job in firsts.values()}
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                first = firsts[job.sensor] is job
                try:
                    seconds = fut.result()
                except grpc.RpcError as e:
                    failures += 1
                    progress.finished(label(job), 0.0, ok=False)
                    progress.say(f"render-grpc: {label(job)}: {e.code().name}: {e.details()}")
                else:
                    written[job.sensor].append(job)
                    progress.finished(label(job), seconds)
                    if first and counts[job.sensor] > 1:
                        unit, more = sensors[job.sensor].unit, counts[job.sensor] - 1
                        progress.say(f"{job.sensor}: first {unit} in {seconds:.1f} s; {more} more to go")
                if first:
                    for other in rest.pop(job.sensor, []):
                        pending[pool.submit(timed, other)] = other
    key = operator.attrgetter("index", "path", "start_us", "end_us")
    return Results({k: tuple(sorted(v, key=key)) for k, v in written.items()}, failures, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Write: animations, timestamps.json, render_grpc_cli_args.json


def write_outputs(
    plan: Plan,
    results: Results,
    *,
    video_format: Sequence[str] = tuple(_VIDEO.default),
    video_fps: float | None = None,
    args: Mapping[str, Any] | None = None,
) -> None:
    """Writes the run's summary files under `plan.output_dir` and prints what it wrote.

    Each camera with frames gets `<camera>.<format>` for each of `video_format` (mp4, gif; "none" for
    neither) at `video_fps`, else the rate its frames were recorded at; `timestamps.json` lists each
    sensor's files and windows; `render_grpc_cli_args.json` holds `args` (the flags' values). The last
    line printed counts the files and failures."""
    formats = [f for f in video_format if f != "none"]
    stamps = {}
    for sensor in plan.sensors:
        done = results.written[sensor.id]
        stamps[sensor.id] = [
            {"file": os.path.basename(j.path), "frame_start_us": j.start_us, "frame_end_us": j.end_us} for j in done
        ]
        if formats and done and sensor.kind == "camera":
            fps = video_fps or sensor.fps or _video.DEFAULT_FPS
            for video in _video.write_animations([j.path for j in done], sensor.directory, formats, fps):
                print(f"{video}  ({len(done)} frames at {fps:.3g} fps)")
    with open(os.path.join(plan.output_dir, "timestamps.json"), "w") as f:
        json.dump(stamps, f, indent=1)
    with open(os.path.join(plan.output_dir, "render_grpc_cli_args.json"), "w") as f:
        json.dump(dict(args or {}), f, indent=1)
    n = sum(len(v) for v in results.written.values())
    print(
        f"render-grpc: {n} image(s) / spin(s) in {os.path.abspath(plan.output_dir)} "
        f"({results.seconds:.1f} s, {results.failures} failed)"
    )


# --------------------------------------------------------------------------------------------
# The command: connect, plan, run, write, undo the edits, shut down


class _Exit(Exception):
    """Ends render-grpc before rendering: `line` on stderr, exit status `code`."""

    def __init__(self, line: str, code: int = 1):
        super().__init__(line)
        self.code = code


def _open_scene(scene_id: str, path: str, timeout: float):
    """Connects to the server and asks about scene `scene_id` (the file at `path`).

    Returns (channel, stub, metadata to send with each scene call, Answers); raises _Exit when the flags
    are bad, no server answers, or it does not serve the scene and no --scene-url says where to get it."""
    from nurec_jax._proto import common_pb2, sensorsim_pb2, sensorsim_pb2_grpc
    from nurec_jax.server import auth

    target = f"{_HOST.value}:{_PORT.value}"
    limit = 64 << 20
    try:
        channel = auth.client_channel(
            target,
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
            ca_file=_TLS_CA.value or None,
            cert_file=_TLS_CERT.value or None,
            key_file=_TLS_KEY.value or None,
            server_name=_TLS_NAME.value or None,
            token_file=_TOKEN_FILE.value or None,
        )
    except ValueError as e:
        raise _Exit(f"render-grpc: {e}", 2) from None
    stub = sensorsim_pb2_grpc.SensorsimServiceStub(channel)
    version, error = _connect(stub, target, tls=bool(_TLS_CA.value or _TLS_CERT.value))
    if error is not None:
        raise _Exit(error)
    try:
        available = set(stub.get_available_scenes(common_pb2.Empty(), timeout=timeout).scene_ids)
    except grpc.RpcError as e:
        raise _Exit(f"render-grpc: cannot reach the server at {target}: {e.code().name} {e.details()}") from None
    print(f"server {version.version_id} ({version.git_hash}); scene {scene_id!r}")
    md = ()
    if scene_id not in available:
        if not _SCENE_URL.value:  # the server never reads paths a client names, only URLs it downloads
            raise _Exit(
                f"render-grpc: the server does not serve scene {scene_id!r}; start serve-grpc with an "
                f"--artifact-glob that matches {path}, or pass --scene-url (an http(s) URL of the file)"
            )
        md = (("x-nre-scene-url", _SCENE_URL.value), ("x-nre-scene-id", scene_id))
    try:
        answers = Answers(
            cameras=stub.get_available_cameras(
                sensorsim_pb2.AvailableCamerasRequest(scene_id=scene_id), metadata=md, timeout=timeout
            ),
            trajectories=stub.get_available_trajectories(
                sensorsim_pb2.AvailableTrajectoriesRequest(scene_id=scene_id), metadata=md, timeout=timeout
            ),
            ego_masks=stub.get_available_ego_masks(common_pb2.Empty(), timeout=timeout),
        )
    except grpc.RpcError as e:
        raise _Exit(f"render-grpc: {e.code().name}: {e.details()}") from None
    return channel, stub, md, answers


def _apply_edit(stub, scene_id: str, md, timeout: float):
    """Sends --edit-assets; returns the EditAssetsRequest applied. Raises _Exit when it is bad or refused."""
    try:
        edit = _edit_request(_EDIT_ASSETS.value, scene_id)
        reply = stub.edit_assets(edit, metadata=md, timeout=timeout)
    except (ValueError, OSError) as e:
        raise _Exit(f"render-grpc: --edit-assets: {e}") from None
    except grpc.RpcError as e:
        raise _Exit(f"render-grpc: edit_assets: {e.code().name}: {e.details()}") from None
    if not reply.success:
        raise _Exit(f"render-grpc: edit_assets: {reply.message}")
    print(f"edit_assets: {reply.message} ({len(edit.replace)} replaced, {len(edit.insert)} inserted)")
    return edit


def _finish(stub, scene_id: str, md, timeout: float, *, undo_edits: bool, shut_down: bool) -> int:
    """Undoes the edits (with `undo_edits`) and shuts the server down (with `shut_down`); returns 1 when
    the undo failed (a failed shut_down is only reported), else 0."""
    from nurec_jax._proto import common_pb2, sensorsim_pb2

    failures = 0
    if undo_edits:
        try:
            stub.restore_model_parameters(
                sensorsim_pb2.RestoreModelParametersRequest(scene_id=scene_id), metadata=md, timeout=timeout
            )
            print("restore_model_parameters: edits undone")
        except grpc.RpcError as e:
            print(f"render-grpc: restore_model_parameters failed: {e.code().name} {e.details()}", file=sys.stderr)
            failures += 1
    if shut_down:
        try:
            stub.shut_down(common_pb2.Empty(), timeout=10)
            print("render-grpc: server shut down")
        except grpc.RpcError as e:
            print(f"render-grpc: shut_down failed: {e.code().name} {e.details()}", file=sys.stderr)
    return failures


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nurec_jax._proto import sensorsim_pb2
    from nurec_jax.scene import read_scene_metadata

    options = Options.from_flags()
    path = os.path.abspath(_ARTIFACT.value)
    scene_meta = read_scene_metadata(path)
    scene_id = scene_meta.scene_id
    edit = None
    try:
        channel, stub, md, answers = _open_scene(scene_id, path, options.timeout_s)
        check_cameras(options.camera_id, answers)  # before any edit: nothing to undo yet
        edit = _apply_edit(stub, scene_id, md, options.timeout_s) if _EDIT_ASSETS.value else None
        demo_tracks = _demo_tracks(stub, sensorsim_pb2, scene_id, md) if options.demo_actor_transform else []
        plan = plan_jobs(options, scene_meta, answers, demo_tracks)
    except _Exit as e:
        print(e, file=sys.stderr)
        return e.code
    except PlanError as e:
        print(f"render-grpc: {e}", file=sys.stderr)
        if edit is not None:  # a plan refused after the edit (e.g. a bad --lidar-id): leave the scene as found
            _finish(stub, scene_id, md, options.timeout_s, undo_edits=True, shut_down=False)
        return 1
    results = run_jobs(
        stub,
        plan,
        save=functools.partial(save_reply, bev_color=options.lidar_bev_color),
        metadata=md,
        timeout=options.timeout_s,
        workers=options.workers,
        bar=options.progress,
    )
    args = {name: flags.FLAGS[name].value for name in _flags.own_flags(globals())}
    write_outputs(plan, results, video_format=options.video_format, video_fps=options.video_fps, args=args)
    failures = results.failures + _finish(
        stub, scene_id, md, options.timeout_s, undo_edits=edit is not None, shut_down=_SHUTDOWN.value
    )
    channel.close()
    return 1 if failures else 0


def _edit_request(value: str, scene_id: str):
    """--edit-assets (inline JSON or a .json path) -> EditAssetsRequest for `scene_id`."""
    from google.protobuf import json_format

    from nurec_jax._proto import sensorsim_pb2

    text = value
    if not value.lstrip().startswith("{"):
        with open(os.path.expanduser(value)) as f:
            text = f.read()
    try:
        req = json_format.Parse(text, sensorsim_pb2.EditAssetsRequest())
    except json_format.ParseError as e:
        raise ValueError(f"not an EditAssetsRequest: {e}") from None
    req.scene_id = scene_id
    return req


_RANGES = {
    "port": _flags.Range(1, 65535),
    "height": _flags.Range(1, 65535),
    "frame_step": _flags.AT_LEAST_1,
    "max_frames": _flags.AT_LEAST_1,
    "concurrency": _flags.AT_LEAST_1,
    "video_fps": _flags.POSITIVE,
    "connect_timeout_s": _flags.POSITIVE,
    "timeout_s": _flags.POSITIVE,
    "lidar_frame_step": _flags.AT_LEAST_1,
    "lidar_raydrop_threshold": _flags.FRACTION,
    "lidar_opacity_threshold": _flags.FRACTION,
    "lidar_distance_filter_threshold": _flags.NON_NEGATIVE,
}
_REQUIRED = {
    "artifact_path": "the scene .usdz the server serves; its recorded frames are read",
    "output_dir": "where images are written",
}


def _video_formats(values: list[str]) -> bool:
    return set(values) <= {*_video.FORMATS, "none"} and not ("none" in values and len(values) > 1)


flags.register_validator(
    "video_format", _video_formats, message="--video-format takes mp4 and/or gif separated by a comma, or none"
)


def main():
    _flags.run(
        one_line_scene_errors(_main, "render-grpc"),
        prog="render-grpc",
        module_globals=globals(),
        groups=_help.RENDER_GRPC,
        ranges=_RANGES,
        required=_REQUIRED,
    )


if __name__ == "__main__":
    main()
