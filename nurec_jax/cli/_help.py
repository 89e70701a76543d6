"""What `--help` prints for each command: its own flags in the groups NuRec's docs use, NuRec's spelling.

The group tables name flags by their absl names. A flag a table leaves out is still listed (under
"Other flags"), and a name a table has that the command does not define is skipped, so a flag added
to a command shows up in its help even before someone files it into a group.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from collections.abc import Sequence

from absl import flags

_NAME_COLUMN = 34
_METAVAR = {"int": "INT", "float": "FLOAT", "comma separated list of strings": "A,B"}
# A string flag's value by the end of its name: `--output-dir=DIR`, `--artifact-glob=GLOB`.
_STRING_METAVAR = (
    ("_dir", "DIR"),
    ("_cache", "DIR"),
    ("_file", "FILE"),
    ("_path", "FILE"),
    ("_logfile", "FILE"),
    ("_glob", "GLOB"),
    ("_url", "URL"),
    ("host", "HOST"),
    ("scene", "FILE"),
)

SERVE_GRPC = (
    ("Server", ("host", "port", "health_port", "max_workers", "max_message_mb", "shutdown_grace_s")),
    (
        "Scenes",
        (
            "artifact_glob",
            "test_scenes_are_valid",
            "cache_size",
            "egocar_hood_dir",
            "enable_editing_actors",
            "asset_dir",
        ),
    ),
    (
        "Rendering",
        (
            "devices",
            "max_backends_per_scene",
            "warmup_compiles",
            "warmup_height",
            "ray_chunk_size",
            "lidar_repeated_fields",
            "initial_pair_capacity",
            "max_pair_capacity",
            "max_output_pixels",
            "max_compiled_variants",
            "compilation_cache_dir",
        ),
    ),
    (
        "DiFix / post-processing",
        ("enable_difix", "difix_url", "difix_cache", "difix_model_filename", "difix_resolution"),
    ),
    (
        "Profiling and operations",
        (
            "enable_timing",
            "timing_verbosity",
            "timing_logfile",
            "timing_synchronize",
            "profiling_backend",
            "profiling_trace_dir",
            "metrics_output_dir",
            "metrics_port",
            "log_format",
            "log_level",
        ),
    ),
    (
        "Security (who may call)",
        ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file", "allow_remote_shutdown"),
    ),
    (
        "Downloads (x-nre-scene-url)",
        (
            "download_cache_dir",
            "download_cache_size",
            "download_max_bytes",
            "download_timeout_s",
            "download_stall_timeout_s",
            "download_workers",
            "download_allow_private",
            "download_allow_hosts",
        ),
    ),
    ("Accepted for NuRec compatibility", ("enable_nrend", "renderer", "enable_harmonizer")),
)

RENDER_GRPC = (
    (
        "Scene and output",
        ("artifact_path", "output_dir", "scene_url", "image_format", "frame_naming", "video_format", "video_fps"),
    ),
    ("Server connection", ("host", "port", "connect_timeout_s", "timeout_s", "shutdown_server_on_completion")),
    ("Security", ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name", "auth_token_file")),
    ("Cameras", ("camera_id", "height", "frame_step", "max_frames", "disable_rolling_shutter", "rig_name")),
    ("Actors", ("edit_assets", "demo_actor_transform")),
    (
        "Lidar",
        (
            "lidar",
            "lidar_id",
            "lidar_type",
            "lidar_format",
            "lidar_frame_step",
            "lidar_raydrop_threshold",
            "lidar_opacity_threshold",
            "lidar_distance_filter",
            "lidar_distance_filter_threshold",
            "lidar_bev_color",
        ),
    ),
    ("Requests and progress", ("sequential", "concurrency", "progress")),
    ("Logging", ("log_format", "log_level")),
)

SCENE_INFO = (
    ("Scene", ("scene", "metadata_only", "max_payload_mb")),
    ("Logging", ("log_format", "log_level")),
)

RENDER_FRAME = (
    ("Scene", ("scene", "trajectory_idx")),
    ("Cameras and frames", ("cameras", "frames", "width", "disable_rolling_shutter")),
    ("Output", ("output_dir", "depth")),
    ("Logging", ("log_format", "log_level")),
)


def _wrap(text: str, width: int) -> list[str]:
    # Paths and flag names stay whole (`--difix-cache`, `~/.cache/nurec-jax/...`).
    return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)


def _metavar(flag) -> str:
    kind = flag.parser.flag_type()
    if kind == "float" and flag.name.endswith("_s"):
        return "SECONDS"
    if kind in _METAVAR:
        return _METAVAR[kind]
    return next((m for end, m in _STRING_METAVAR if flag.name.endswith(end)), "TEXT")


def _synopsis(flag, multi: dict[str, int]) -> str:
    name = flag.name.replace("_", "-")
    if flag.boolean:
        return f"--[no-]{name}"
    if flag.name in multi:
        return f"--{name} " + ("H W" if multi[flag.name] == 2 else " ".join(["V"] * multi[flag.name]))
    values = getattr(flag.parser, "enum_values", None)
    if values:
        return f"--{name}={{{','.join(values)}}}"
    return f"--{name}={_metavar(flag)}"


def _default(flag) -> str | None:
    value = flag.default
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _flag_lines(flag, multi: dict[str, int], width: int) -> list[str]:
    synopsis = "  " + _synopsis(flag, multi)
    text = re.sub(r"^<[^>]*>: ", "", " ".join(str(flag.help).split()))  # absl prefixes enums' choices
    default = _default(flag)
    if default is not None:
        text += f" (default: {default})"
    body = _wrap(text, width - _NAME_COLUMN) or [""]
    if len(synopsis) + 2 <= _NAME_COLUMN:
        lines = [synopsis.ljust(_NAME_COLUMN) + body[0]]
    else:
        lines = [synopsis, " " * _NAME_COLUMN + body[0]]
    return lines + [" " * _NAME_COLUMN + line for line in body[1:]]


def format_help(
    prog: str,
    doc: str,
    groups: Sequence[tuple[str, Sequence[str]]],
    names: Sequence[str],
    multi: dict[str, int] | None = None,
    flag_values=flags.FLAGS,
) -> str:
    """The text of `prog --help`.

    Args:
        prog: the command's name.
        doc: the CLI module's docstring (what the command does, examples).
        groups: (title, flag names) in display order.
        names: every flag the command defines; those in no group go last, under "Other flags".
        multi: tuple flags given as separate words (name -> count), shown as `--name H W`.
    """
    multi = multi or {}
    width = max(80, min(shutil.get_terminal_size((100, 24)).columns, 120))
    own = [n for n in names if n in flag_values]
    out = [f"usage: {prog} [flags]", "", textwrap.dedent(doc).strip(), ""]
    placed = set()
    sections = [(title, [n for n in members if n in own]) for title, members in groups]
    sections.append(("Other flags", [n for n in own if not any(n in members for _, members in groups)]))
    for title, members in sections:
        if not members:
            continue
        out.append(f"{title}:")
        for name in members:
            if name not in placed:
                placed.add(name)
                out.extend(_flag_lines(flag_values[name], multi, width))
        out.append("")
    out.extend(
        _wrap(
            "Flags take dashes or underscores (--output-dir, --output_dir), and booleans --x / --no-x. "
            "--helpfull also lists absl's own flags (logging, debugging).",
            width,
        )
    )
    return "\n".join(out)
