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

import functools
import os
import re
import sys

# gRPC's own log would repeat every failed TLS handshake while render-grpc waits for the server; its
# errors still show, and render-grpc says in one line why it gave up.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc
from absl import app, flags

from nurec_jax.cli import _flags, _help, _video
from nurec_jax.cli.render_jobs import (
    Answers,
    Options,
    PlanError,
    _trajectory,
    check_cameras,
    plan_jobs,
    run_jobs,
    save_reply,
    write_outputs,
)
from nurec_jax.cli.scene_errors import one_line_scene_errors

_D = Options  # the flags' defaults
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
    "height", _D.height, "Output height, pixels (width follows the camera's aspect, NuRec's rule)."
)
_CAMERA = flags.DEFINE_list("camera_id", list(_D.camera_id), "Camera logical id(s), comma separated.")
_FORMAT = flags.DEFINE_enum("image_format", _D.image_format, ["png", "jpeg"], "Image format.")
_FRAME_STEP = flags.DEFINE_integer("frame_step", _D.frame_step, "Render every n-th recorded frame.")
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
    "frame_naming", _D.frame_naming, ["frame-end-timestamp", "contiguous-output-index"], "Image file names."
)
_SEQUENTIAL = flags.DEFINE_boolean("sequential", False, "One request at a time.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", _D.concurrency, "Requests in flight at once (unless --sequential).")
_VIDEO = flags.DEFINE_list(
    "video_format",
    list(_D.video_format),
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
    "timeout_s",
    _D.timeout_s,
    "Per-request deadline, seconds (the first request of a new size includes the server's compile).",
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
_LIDAR_TYPE = flags.DEFINE_enum("lidar_type", _D.lidar_type, ["PANDAR128", "AT128"], "LidarSpec.lidar_type.")
_LIDAR_FORMAT = flags.DEFINE_enum(
    "lidar_format", _D.lidar_format, ["ply", "bin"], "ply, or bin (N x 4 float32: x, y, z, intensity)."
)
_LIDAR_STEP = flags.DEFINE_integer("lidar_frame_step", None, "Every n-th spin (default: --frame-step).")
_LIDAR_RAYDROP = flags.DEFINE_float(
    "lidar_raydrop_threshold", _D.lidar_raydrop_threshold, "render_filter.raydrop_threshold."
)
_LIDAR_OPACITY = flags.DEFINE_float(
    "lidar_opacity_threshold", _D.lidar_opacity_threshold, "render_filter.opacity_threshold."
)
_LIDAR_DFILTER = flags.DEFINE_boolean("lidar_distance_filter", False, "render_filter.enable_distance_filter.")
_LIDAR_DFILTER_T = flags.DEFINE_float(
    "lidar_distance_filter_threshold", _D.lidar_distance_filter_threshold, "render_filter.distance_filter_threshold."
)
_BEV_COLOR = flags.DEFINE_enum(
    "lidar_bev_color",
    _D.lidar_bev_color,
    ["height", "intensity"],
    "BEV colouring: height -2.5 .. +3 m about the sensor, or intensity 0 .. 1.",
)


def _demo_tracks(stub, sensorsim_pb2, scene_id, metadata):
    """The scene's controllable tracks as (id, timestamps, poses), fetched once."""
    objs = stub.get_dynamic_objects(
        sensorsim_pb2.AvailableDynamicObjectsRequest(scene_id=scene_id), metadata=metadata, timeout=_TIMEOUT.value
    )
    return [(track.id, *_trajectory(track.trajectory)) for track in objs.dynamic_objects]


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
