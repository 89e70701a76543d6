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
import json
import os
import re
import sys
import time

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


def _render_all(jobs, run, written, progress: _progress.Progress, first_notes: dict[str, tuple[str, str, str]]) -> int:
    """Runs `run(job)` for every (sensor, index, start_us, end_us, request) job on --concurrency threads
    (one with --sequential), files each result in `written[sensor]` and returns how many failed.

    The first job of each sensor runs before that sensor's others: the server compiles for a size (or
    lidar pass) it has not rendered yet during that request, and the others would only queue behind it."""
    counts = collections.Counter(job[0] for job in jobs)
    firsts: dict[str, tuple] = {}
    later: dict[str, list[tuple]] = collections.defaultdict(list)
    for job in jobs:
        if job[0] in firsts:
            later[job[0]].append(job)
        else:
            firsts[job[0]] = job

    def note(sensor) -> tuple[str, str, str]:
        return first_notes.get(sensor, ("a renderer", "first request", "frame"))

    def label(job) -> str:
        return f"{job[0]} {note(job[0])[2]} {job[1] + 1}/{counts[job[0]]}"

    def timed(job):
        if firsts[job[0]] is job:
            what, why, _ = note(job[0])
            progress.say(f"{job[0]}: compiling {what} on the server unless it already has ({why})")
        progress.started(label(job))
        t0 = time.perf_counter()
        return run(job), time.perf_counter() - t0

    failures = 0
    workers = 1 if _SEQUENTIAL.value else max(1, _CONCURRENCY.value)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = {pool.submit(timed, job): job for job in firsts.values()}
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                first = firsts[job[0]] is job
                try:
                    (sensor, index, out, s_us, e_us), seconds = fut.result()
                except grpc.RpcError as e:
                    failures += 1
                    progress.finished(label(job), 0.0, ok=False)
                    progress.say(f"render-grpc: {label(job)}: {e.code().name}: {e.details()}")
                else:
                    written[sensor].append((index, out, s_us, e_us))
                    progress.finished(label(job), seconds)
                    if first and counts[sensor] > 1:
                        progress.say(
                            f"{sensor}: first {note(sensor)[2]} in {seconds:.1f} s; {counts[sensor] - 1} more to go"
                        )
                if first:
                    for other in later.pop(job[0], []):
                        pending[pool.submit(timed, other)] = other
    return failures


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nurec_jax import geometry
    from nurec_jax._proto import common_pb2, sensorsim_pb2, sensorsim_pb2_grpc
    from nurec_jax.scene import read_scene_metadata
    from nurec_jax.server import convert

    path = os.path.abspath(_ARTIFACT.value)
    scene_meta = read_scene_metadata(path)
    scene_id = scene_meta.scene_id
    from nurec_jax.server import auth

    limit = 64 << 20
    try:
        channel = auth.client_channel(
            f"{_HOST.value}:{_PORT.value}",
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
            ca_file=_TLS_CA.value or None,
            cert_file=_TLS_CERT.value or None,
            key_file=_TLS_KEY.value or None,
            server_name=_TLS_NAME.value or None,
            token_file=_TOKEN_FILE.value or None,
        )
    except ValueError as e:
        print(f"render-grpc: {e}", file=sys.stderr)
        return 2
    stub = sensorsim_pb2_grpc.SensorsimServiceStub(channel)
    timeout = _TIMEOUT.value
    target = f"{_HOST.value}:{_PORT.value}"
    version, error = _connect(stub, target, tls=bool(_TLS_CA.value or _TLS_CERT.value))
    if error is not None:
        print(error, file=sys.stderr)
        return 1
    try:
        available = set(stub.get_available_scenes(common_pb2.Empty(), timeout=timeout).scene_ids)
    except grpc.RpcError as e:
        print(f"render-grpc: cannot reach the server at {target}: {e.code().name} {e.details()}", file=sys.stderr)
        return 1
    print(f"server {version.version_id} ({version.git_hash}); scene {scene_id!r}")
    md = ()
    if scene_id not in available:
        if not _SCENE_URL.value:  # the server never reads paths a client names, only URLs it downloads
            print(
                f"render-grpc: the server does not serve scene {scene_id!r}; start serve-grpc with an "
                f"--artifact-glob that matches {path}, or pass --scene-url (an http(s) URL of the file)",
                file=sys.stderr,
            )
            return 1
        md = (("x-nre-scene-url", _SCENE_URL.value), ("x-nre-scene-id", scene_id))
    try:
        cams = stub.get_available_cameras(
            sensorsim_pb2.AvailableCamerasRequest(scene_id=scene_id), metadata=md, timeout=timeout
        )
        trajs = stub.get_available_trajectories(
            sensorsim_pb2.AvailableTrajectoriesRequest(scene_id=scene_id), metadata=md, timeout=timeout
        )
        masks = stub.get_available_ego_masks(common_pb2.Empty(), timeout=timeout)
    except grpc.RpcError as e:
        print(f"render-grpc: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    by_id = {}
    for c in cams.available_cameras:  # the first calibration of each logical id (one per trajectory)
        by_id.setdefault(c.logical_id, c)
    unknown = [c for c in _CAMERA.value if c not in by_id]
    if unknown:
        print(f"render-grpc: unknown camera(s) {unknown}; the scene has {sorted(by_id)}", file=sys.stderr)
        return 1
    if not trajs.available_trajectories:
        print("render-grpc: the scene has no ego trajectory to walk", file=sys.stderr)
        return 1
    # Each camera (and lidar) walks the trajectory it belongs to (AvailableCamera.trajectory_idx).
    rig_by_idx = {t.trajectory_idx: _trajectory(t.trajectory) for t in trajs.available_trajectories}
    first_rig = _trajectory(trajs.available_trajectories[0].trajectory)
    hoods = {(m.ego_mask_id.rig_config_id, m.ego_mask_id.camera_logical_id) for m in masks.ego_mask_metadata}

    edit = None
    if _EDIT_ASSETS.value:
        try:
            edit = _edit_request(_EDIT_ASSETS.value, scene_id)
            reply = stub.edit_assets(edit, metadata=md, timeout=timeout)
        except (ValueError, OSError) as e:
            print(f"render-grpc: --edit-assets: {e}", file=sys.stderr)
            return 1
        except grpc.RpcError as e:
            print(f"render-grpc: edit_assets: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        if not reply.success:
            print(f"render-grpc: edit_assets: {reply.message}", file=sys.stderr)
            return 1
        print(f"edit_assets: {reply.message} ({len(edit.replace)} replaced, {len(edit.insert)} inserted)")
    demo_tracks = _demo_tracks(stub, sensorsim_pb2, scene_id, md) if _DEMO_ACTORS.value else []
    jobs = []
    written: dict[str, list[tuple[int, str, int, int]]] = {c: [] for c in _CAMERA.value}
    rates: dict[str, float | None] = {}  # frames per second each camera's frames were recorded at
    first_notes: dict[str, tuple[str, str, str]] = {}  # sensor -> (what its first request compiles, why, unit)
    for cam_id in _CAMERA.value:
        cam = by_id[cam_id]
        spec = sensorsim_pb2.CameraSpec()
        spec.CopyFrom(cam.intrinsics)
        if _DISABLE_RS.value:
            spec.shutter_type = sensorsim_pb2.GLOBAL
        rig_to_cam = _pose_to_matrix(cam.rig_to_camera)  # camera -> rig (docs/wire.md#camera-mounts)
        rig_ts, rig_mats = rig_by_idx.get(cam.trajectory_idx, first_rig)
        try:
            cal = scene_meta.camera(cam_id, cam.trajectory_idx)
        except KeyError:
            cal = scene_meta.cameras.get(cam_id)
        if cal is not None and len(cal.frame_timestamps_us):
            windows = [(int(s), int(e)) for s, e in cal.frame_timestamps_us]
        else:
            windows = [(int(t), int(t) + 1) for t in rig_ts]
        windows = windows[:: _FRAME_STEP.value]
        rates[cam_id] = _video.implied_fps([e for _, e in windows])
        windows = windows[: _MAX_FRAMES.value]
        w, h = _output_size(cam.intrinsics, _HEIGHT.value)
        size = f"{w}x{h} images" if w else f"images {h} high"
        first_notes[cam_id] = (size, "first request of this size", "frame")
        for index, (s_us, e_us) in enumerate(windows):
            s_us, e_us = max(s_us, int(rig_ts[0])), min(e_us, int(rig_ts[-1]) + 1)
            poses = [geometry.interpolate_poses(rig_ts, rig_mats, t) @ rig_to_cam for t in (s_us, e_us)]
            req = sensorsim_pb2.RGBRenderRequest(
                scene_id=scene_id,
                resolution_h=_HEIGHT.value,
                resolution_w=1,
                camera_intrinsics=spec,
                frame_start_us=s_us,
                frame_end_us=e_us,
                sensor_pose=sensorsim_pb2.PosePair(
                    start_pose=convert.se3_to_grpc_pose(poses[0]), end_pose=convert.se3_to_grpc_pose(poses[1])
                ),
                image_format=sensorsim_pb2.PNG if _FORMAT.value == "png" else sensorsim_pb2.JPEG,
                image_quality=95.0,
            )
            if _RIG_NAME.value and (_RIG_NAME.value, cam_id) in hoods:
                req.insert_ego_mask = True
                req.ego_mask_id.CopyFrom(
                    sensorsim_pb2.EgoMaskId(camera_logical_id=cam_id, rig_config_id=_RIG_NAME.value)
                )
            if _DEMO_ACTORS.value:
                req.dynamic_objects.extend(_demo_actors(demo_tracks, sensorsim_pb2, s_us, e_us))
            jobs.append((cam_id, index, s_us, e_us, req))

    lidar_jobs = []
    if _LIDAR.value:
        lidar_cals = list(scene_meta.lidar_list)
        if _LIDAR_ID.value is not None:
            lidar_cals = [c for c in lidar_cals if c.logical_id == _LIDAR_ID.value]
            if not lidar_cals:
                print(
                    f"render-grpc: the scene has no lidar {_LIDAR_ID.value!r} ({sorted(scene_meta.lidars) or 'none'})",
                    file=sys.stderr,
                )
                return 1
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
        windows = windows[:: _LIDAR_STEP.value or _FRAME_STEP.value][: _MAX_FRAMES.value]
        for index, (s_us, e_us) in enumerate(windows):
            s_us, e_us = max(s_us, int(rig_ts[0])), min(e_us, int(rig_ts[-1]) + 1)
            poses = [geometry.interpolate_poses(rig_ts, rig_mats, t) @ t_lidar_rig for t in (s_us, e_us)]
            req = sensorsim_pb2.LidarRenderRequest(
                scene_id=scene_id,
                lidar_config=sensorsim_pb2.LidarSpec(lidar_type=sensorsim_pb2.LidarDeviceType.Value(_LIDAR_TYPE.value)),
                frame_start_us=s_us,
                frame_end_us=e_us,
                sensor_pose=sensorsim_pb2.PosePair(
                    start_pose=convert.se3_to_grpc_pose(poses[0]), end_pose=convert.se3_to_grpc_pose(poses[1])
                ),
                render_filter=sensorsim_pb2.LidarRenderFilter(
                    raydrop_threshold=_LIDAR_RAYDROP.value,
                    opacity_threshold=_LIDAR_OPACITY.value,
                    enable_distance_filter=_LIDAR_DFILTER.value,
                    distance_filter_threshold=_LIDAR_DFILTER_T.value,
                ),
            )
            if _DEMO_ACTORS.value:
                req.dynamic_objects.extend(_demo_actors(demo_tracks, sensorsim_pb2, s_us, e_us))
            lidar_jobs.append((lidar_id, index, s_us, e_us, req))
        os.makedirs(os.path.join(_OUTPUT.value, lidar_id), exist_ok=True)
        written[lidar_id] = []
        first_notes[lidar_id] = (f"the {_LIDAR_TYPE.value} lidar pass", "first spin of this lidar type", "spin")

    ext = "png" if _FORMAT.value == "png" else "jpeg"

    def run(job):
        cam_id, index, s_us, e_us, req = job
        name = f"{e_us}" if _FRAME_NAMING.value == "frame-end-timestamp" else f"{index:06d}"
        if isinstance(req, sensorsim_pb2.LidarRenderRequest):
            from nurec_jax import pointcloud

            reply = stub.render_lidar(req, metadata=md, timeout=timeout, wait_for_ready=True)
            pts = np.frombuffer(reply.point_xyzs_buffer, "<f4").reshape(-1, 3)
            inten = np.frombuffer(reply.point_intensities_buffer, "<f4")
            rings = np.frombuffer(reply.point_ring_ids_buffer, "<u2") if reply.point_ring_ids_buffer else None
            out = os.path.join(_OUTPUT.value, cam_id, f"{name}.{_LIDAR_FORMAT.value}")
            if _LIDAR_FORMAT.value == "ply":
                pointcloud.write_ply(out, pts, inten, rings)
            else:
                np.concatenate([pts, inten[:, None]], 1).astype("<f4").tofile(out)
            pointcloud.write_bev_png(
                os.path.join(_OUTPUT.value, cam_id, f"{name}_bev.png"),
                pts,
                inten if _BEV_COLOR.value == "intensity" else None,
                value_range=(0.0, 1.0) if _BEV_COLOR.value == "intensity" else (-2.5, 3.0),
                value_label="intensity" if _BEV_COLOR.value == "intensity" else "height (m)",
            )
            return cam_id, index, out, s_us, e_us
        reply = stub.render_rgb(req, metadata=md, timeout=timeout, wait_for_ready=True)
        out = os.path.join(_OUTPUT.value, cam_id, f"{name}.{ext}")
        with open(out, "wb") as f:
            f.write(reply.image_bytes)
        return cam_id, index, out, s_us, e_us

    jobs.extend(lidar_jobs)

    for cam_id in _CAMERA.value:
        os.makedirs(os.path.join(_OUTPUT.value, cam_id), exist_ok=True)
    start = time.perf_counter()
    with _progress.Progress(len(jobs), bar=_PROGRESS.value) as progress:
        failures = _render_all(jobs, run, written, progress, first_notes)
    elapsed = time.perf_counter() - start
    stamps = {}
    for cam_id, items in written.items():
        items.sort()
        stamps[cam_id] = [{"file": os.path.basename(p), "frame_start_us": s, "frame_end_us": e} for _, p, s, e in items]
        formats = [f for f in _VIDEO.value if f != "none"]
        if formats and items and cam_id in _CAMERA.value:
            fps = _FPS.value or rates.get(cam_id) or _video.DEFAULT_FPS
            for video in _video.write_animations(
                [p for _, p, _, _ in items], os.path.join(_OUTPUT.value, cam_id), formats, fps
            ):
                print(f"{video}  ({len(items)} frames at {fps:.3g} fps)")
    with open(os.path.join(_OUTPUT.value, "timestamps.json"), "w") as f:
        json.dump(stamps, f, indent=1)
    with open(os.path.join(_OUTPUT.value, "render_grpc_cli_args.json"), "w") as f:
        json.dump({name: flags.FLAGS[name].value for name in _flags.own_flags(globals())}, f, indent=1)
    n = sum(len(v) for v in written.values())
    print(
        f"render-grpc: {n} image(s) / spin(s) in {os.path.abspath(_OUTPUT.value)} ({elapsed:.1f} s, {failures} failed)"
    )
    if edit is not None:
        try:
            stub.restore_model_parameters(
                sensorsim_pb2.RestoreModelParametersRequest(scene_id=scene_id), metadata=md, timeout=timeout
            )
            print("restore_model_parameters: edits undone")
        except grpc.RpcError as e:
            print(f"render-grpc: restore_model_parameters failed: {e.code().name} {e.details()}", file=sys.stderr)
            failures += 1
    if _SHUTDOWN.value:
        try:
            stub.shut_down(common_pb2.Empty(), timeout=10)
            print("render-grpc: server shut down")
        except grpc.RpcError as e:
            print(f"render-grpc: shut_down failed: {e.code().name} {e.details()}", file=sys.stderr)
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
