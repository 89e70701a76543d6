"""render-grpc's work, apart from its flags: plan the requests from the server's answers and the options,
run them against a stub, save each reply, write the animations and the summary files.

`plan_jobs` is pure (no calls, no files); `run_jobs` takes any stub with `render_rgb` / `render_lidar`;
`save_reply` and `write_outputs` write files. No absl flag is defined here, so tests import this module
beside any other (render_grpc.py defines the command's flags, taking their defaults from `Options`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import operator
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import grpc
import numpy as np
from absl import flags

from nurec_jax.cli import _progress, _video


def _pose_to_matrix(pose_msg) -> np.ndarray:
    from nurec_jax import geometry
    from nurec_jax.server import convert

    return geometry.pose7_xyzw_to_matrix(convert.grpc_pose_to_tquat(pose_msg))


def _trajectory(traj_msg) -> tuple[np.ndarray, np.ndarray]:
    ts = np.asarray([p.timestamp_us for p in traj_msg.poses], np.int64)
    mats = np.stack([_pose_to_matrix(p.pose) for p in traj_msg.poses]) if len(ts) else np.zeros((0, 4, 4))
    return ts, mats


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


def _output_size(spec, height: int) -> tuple[int, int]:
    """(width, height) the server renders a camera at for render-grpc's request (NuRec's size rule)."""
    from nurec_jax import cameras

    if spec.resolution_w <= 0 or spec.resolution_h <= 0:
        return 0, height
    w, h, _ = cameras.output_resolution(spec.resolution_w, spec.resolution_h, 1, height)
    return w, h


@dataclasses.dataclass(frozen=True)
class Options:
    """The flags' values that shape the jobs, how they are sent and what is written (named as the flags).

    The defaults are render-grpc's (its flags take them from here), so a test names only what it changes;
    `from_flags` reads the parsed flags.
    """

    output_dir: str
    camera_id: tuple[str, ...] = ("camera_front_wide_120fov",)
    height: int = 300
    image_format: str = "jpeg"
    frame_step: int = 1
    max_frames: int | None = None
    frame_naming: str = "frame-end-timestamp"
    disable_rolling_shutter: bool = False
    demo_actor_transform: bool = False
    rig_name: str | None = None
    lidar: bool = False
    lidar_id: str | None = None
    lidar_type: str = "PANDAR128"
    lidar_format: str = "ply"
    lidar_frame_step: int | None = None
    lidar_raydrop_threshold: float = 0.5
    lidar_opacity_threshold: float = 0.0
    lidar_distance_filter: bool = False
    lidar_distance_filter_threshold: float = 0.02
    lidar_bev_color: str = "height"
    sequential: bool = False
    concurrency: int = 4
    timeout_s: float = 600.0
    progress: bool = True
    video_format: tuple[str, ...] = tuple(_video.FORMATS)
    video_fps: float | None = None

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


def save_reply(job: Job, reply, bev_color: str = "height") -> None:
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
    timeout: float = 600.0,
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


def write_outputs(
    plan: Plan,
    results: Results,
    *,
    video_format: Sequence[str] = tuple(_video.FORMATS),
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
