"""`serve-grpc`: serve NuRec scenes over NuRec's SensorsimService gRPC API.

    serve-grpc --artifact-glob='/data/scenes/**/*.usdz' --port=8080 --max-workers=4 --enable-editing-actors

Flags carry NuRec's names and defaults; dashes or underscores, `--no-x` or `--nox` both work.
"""

from __future__ import annotations

import logging
import signal
import sys

from absl import app, flags

from nurec_jax.cli import _flags, _help
from nurec_jax.server import options as opt

_D = opt.ServerOptions()

_ARTIFACT_GLOB = flags.DEFINE_string("artifact_glob", None, "Recursive glob of NuRec .usdz scenes (must end in .usdz).")
_HOST = flags.DEFINE_string("host", _D.host, "Interface to bind (0.0.0.0 for all).")
_PORT = flags.DEFINE_integer("port", _D.port, "gRPC port (0 picks a free one).")
_HEALTH_PORT = flags.DEFINE_integer("health_port", None, "Also serve gRPC health on this port.")
_MAX_WORKERS = flags.DEFINE_integer("max_workers", _D.max_workers, "Render worker threads.")
_TEST_SCENES = flags.DEFINE_boolean(
    "test_scenes_are_valid", _D.test_scenes_are_valid, "Load every scene before reporting SERVING; exit if one fails."
)
_WARMUP = flags.DEFINE_boolean(
    "warmup_compiles",
    _D.warmup_compiles,
    "With --test-scenes-are-valid: after SERVING, render every camera of every scene once "
    "in the background so first requests find compiled functions.",
)
_WARMUP_H = flags.DEFINE_integer(
    "warmup_height",
    _D.warmup_height,
    "Output height of the warm-up renders (the resolution clients will request; width "
    "keeps each camera's aspect); 0: native.",
)
_CACHE_SIZE = flags.DEFINE_integer("cache_size", _D.cache_size, "Scenes kept loaded on the device (LRU).")
_DL_DIR = flags.DEFINE_string("download_cache_dir", _D.download_cache_dir, "Where x-nre-scene-url downloads go.")
_DL_SIZE = flags.DEFINE_integer("download_cache_size", _D.download_cache_size, "Downloaded scenes kept (LRU).")
_DL_MAX = flags.DEFINE_integer(
    "download_max_bytes", _D.download_max_bytes, "Largest scene download accepted (Content-Length and streamed bytes)."
)
# Downloads (nurec-jax)
_DL_TIMEOUT = flags.DEFINE_float(
    "download_timeout_s", _D.download_timeout_s, "Longest a whole x-nre-scene-url download may take."
)
_DL_STALL = flags.DEFINE_float(
    "download_stall_timeout_s", _D.download_stall_timeout_s, "A download that receives no byte for this long fails."
)
_DL_WORKERS = flags.DEFINE_integer(
    "download_workers", _D.download_workers, "Threads for scene downloads (separate from metadata and render workers)."
)
_DL_PRIVATE = flags.DEFINE_boolean(
    "download_allow_private",
    _D.download_allow_private,
    "Allow downloads from loopback, private, link-local and other non-public addresses (refused by default).",
)
_DL_HOSTS = flags.DEFINE_list(
    "download_allow_hosts",
    list(_D.download_allow_hosts),
    "Comma-separated host names ('.example.com' for a domain) or IPs/CIDRs that downloads "
    "may reach even when they resolve to non-public addresses.",
)
_ENABLE_NREND = flags.DEFINE_boolean(
    "enable_nrend", _D.enable_nrend, "Accepted for NuRec compatibility; nurec-jax has one renderer."
)
_RENDERER = flags.DEFINE_enum(
    "renderer",
    _D.renderer,
    list(opt.RENDERERS),
    "Accepted for NuRec compatibility; every choice uses the nurec-jax renderer.",
)
_RAY_CHUNK = flags.DEFINE_integer("ray_chunk_size", _D.ray_chunk_size, "Most lidar rays per pass.")
_EDITING = flags.DEFINE_boolean(
    "enable_editing_actors", _D.enable_editing_actors, "Accept dynamic_objects (actor poses) in render requests."
)
_HOOD_DIR = flags.DEFINE_string("egocar_hood_dir", None, "Ego hood masks: <dir>/<rig_config_id>/<camera>.png.")
_DIFIX = flags.DEFINE_boolean(
    "enable_difix",
    _D.enable_difix,
    "Post-process every camera image with the model at "
    "<--difix-cache>/<--difix-model-filename> (a nurec-jax post-processing model: "
    "tools/make_postprocess_model.py; NVIDIA's DiFix checkpoint cannot be used).",
)
_DIFIX_URL = flags.DEFINE_string(
    "difix_url",
    None,
    "http(s) URL of the post-processing model, downloaded into "
    "--difix-cache when the file is not there (the --download-* rules apply).",
)
_DIFIX_CACHE = flags.DEFINE_string("difix_cache", _D.difix_cache, "DiFix model cache directory.")
_DIFIX_FILE = flags.DEFINE_string("difix_model_filename", _D.difix_model_filename, "DiFix model file name.")
_DIFIX_RES = flags.DEFINE_list("difix_resolution", [str(v) for v in _D.difix_resolution], "DiFix input H W.")
_TIMING = flags.DEFINE_boolean(
    "enable_timing",
    _D.enable_timing,
    "Per-request stage timing (decode, setup, render, post-process, ego mask, encode), logged at --timing-verbosity.",
)
_TIMING_VERB = flags.DEFINE_enum(
    "timing_verbosity", _D.timing_verbosity, list(opt.TIMING_VERBOSITIES), "Timing report detail."
)
_TIMING_LOG = flags.DEFINE_string("timing_logfile", None, "Timing log file.")
_TIMING_SYNC = flags.DEFINE_boolean("timing_synchronize", _D.timing_synchronize, "Synchronise the device per stage.")
_PROFILING = flags.DEFINE_enum(
    "profiling_backend",
    _D.profiling_backend,
    list(opt.PROFILING_BACKENDS),
    "Profiler: JAX (a jax.profiler trace in --profiling-trace-dir with one "
    "range per request stage), NVTX (ranges for Nsight Systems; needs the nvtx package) "
    "or NONE. TRACY (NRE's C++ profiler) is refused.",
)
_METRICS_DIR = flags.DEFINE_string(
    "metrics_output_dir",
    None,
    "Write render-time metrics (metrics.yaml, the first 3 renders skipped) into this directory.",
)
_MAX_BACKENDS = flags.DEFINE_integer(
    "max_backends_per_scene",
    None,
    "With --devices: a scene whose every copy is busy gets another copy on the "
    "least loaded device with room, up to this many (unset: one copy per scene).",
)
_TRACE_DIR = flags.DEFINE_string(
    "profiling_trace_dir",
    _D.profiling_trace_dir,
    "Where --profiling-backend JAX writes its trace (open with TensorBoard/Perfetto).",
)
_METRICS_PORT = flags.DEFINE_integer(
    "metrics_port", None, "Serve GET /metrics (Prometheus text) and /healthz over HTTP on this port (0 picks one)."
)
_HARMONIZER = flags.DEFINE_boolean("enable_harmonizer", _D.enable_harmonizer, "Harmonizer (not available).")
_MAX_MESSAGE_MB = flags.DEFINE_integer(
    "max_message_mb", _D.max_message_bytes >> 20, "gRPC send/receive message limit, MiB."
)
_PAIR_CAP = flags.DEFINE_integer(
    "initial_pair_capacity",
    _D.initial_pair_capacity,
    "First (tile, Gaussian) pair buffer bucket; grows by powers of two as needed.",
)
_MAX_PAIRS = flags.DEFINE_integer(
    "max_pair_capacity", _D.max_pair_capacity, "Largest pair buffer; a frame needing more is RESOURCE_EXHAUSTED."
)
_LIDAR_REPEATED = flags.DEFINE_boolean(
    "lidar_repeated_fields",
    _D.lidar_repeated_fields,
    "Fill LidarRenderReturn's repeated fields as well as its buffers (a full Pandar128 spin is then ~15 MB; "
    "use --no-lidar-repeated-fields for clients with a 10 MB limit).",
)
_COMPILE_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    "~/.cache/nurec-jax/jax-compilation-cache",
    "JAX's persistent compilation cache, so a restarted server does not compile again; empty: off.",
)
_GRACE = flags.DEFINE_float("shutdown_grace_s", _D.shutdown_grace_s, "How long in-flight calls may finish.")
# Who may call. Without these the port is plaintext and open, as NuRec's is (bind it to localhost).
_TLS_CERT = flags.DEFINE_string("tls_cert_file", None, "PEM certificate chain: serve TLS (needs --tls-key-file).")
_TLS_KEY = flags.DEFINE_string("tls_key_file", None, "PEM private key of --tls-cert-file (unencrypted).")
_TLS_CLIENT_CA = flags.DEFINE_string(
    "tls_client_ca_file",
    None,
    "mTLS: refuse clients without a certificate signed by this PEM CA (needs --tls-cert-file).",
)
_TOKEN_FILE = flags.DEFINE_string(
    "auth_token_file",
    None,
    "File holding a token; every call but health must send the metadata "
    "'authorization: Bearer <token>' (UNAUTHENTICATED otherwise).",
)
_REMOTE_SHUTDOWN = flags.DEFINE_boolean(
    "allow_remote_shutdown",
    _D.allow_remote_shutdown,
    "Accept shut_down from non-loopback peers (default: PERMISSION_DENIED).",
)
# Hardening (nurec-jax)
_ASSET_DIR = flags.DEFINE_string(
    "asset_dir",
    None,
    "edit_assets may read .ply asset files only below this "
    "directory (symlinks resolved); unset: only the scenes' own asset banks.",
)
# Bounded work (nurec-jax)
_MAX_OUT_PX = flags.DEFINE_integer(
    "max_output_pixels",
    _D.max_output_pixels,
    "Largest output image (width x height after NuRec's resolution rule) a request "
    "may ask for; larger ones are INVALID_ARGUMENT before anything compiles.",
)
_MAX_VARIANTS = flags.DEFINE_integer(
    "max_compiled_variants",
    _D.max_compiled_variants,
    "Compiled render/lidar functions kept in memory (one per output size, camera "
    "model, scene shape and pair bucket; least recently used freed first).",
)
# Several accelerators (nurec-jax)
_DEVICES = flags.DEFINE_string(
    "devices",
    None,
    "Render on several local accelerators in this process: 'all', or device ids such as "
    "0,1 (as jax.local_devices() numbers them). Each scene is loaded on the least loaded "
    "device and scenes on different devices render at the same time; --cache-size and "
    "--max-workers then count per device, --max-backends-per-scene lets a busy scene "
    "get copies on other devices, and compiled functions are per device (raise "
    "--max-compiled-variants). Unset: the default device only.",
)


def options_from_flags() -> opt.ServerOptions:
    difix_res = _flags.height_width(_DIFIX_RES.value, "difix-resolution")
    return opt.ServerOptions(
        artifact_glob=_ARTIFACT_GLOB.value,
        host=_HOST.value,
        port=_PORT.value,
        health_port=_HEALTH_PORT.value,
        test_scenes_are_valid=_TEST_SCENES.value,
        renderer=_RENDERER.value,
        enable_difix=_DIFIX.value,
        difix_url=_DIFIX_URL.value,
        difix_cache=_DIFIX_CACHE.value,
        difix_model_filename=_DIFIX_FILE.value,
        difix_resolution=difix_res,
        ray_chunk_size=_RAY_CHUNK.value,
        egocar_hood_dir=_HOOD_DIR.value,
        download_cache_dir=_DL_DIR.value,
        download_cache_size=_DL_SIZE.value,
        max_workers=_MAX_WORKERS.value,
        enable_editing_actors=_EDITING.value,
        cache_size=_CACHE_SIZE.value,
        metrics_output_dir=_METRICS_DIR.value,
        enable_nrend=_ENABLE_NREND.value,
        enable_timing=_TIMING.value,
        timing_verbosity=_TIMING_VERB.value,
        timing_logfile=_TIMING_LOG.value,
        timing_synchronize=_TIMING_SYNC.value,
        profiling_backend=_PROFILING.value,
        max_backends_per_scene=_MAX_BACKENDS.value,
        enable_harmonizer=_HARMONIZER.value,
        max_message_bytes=_MAX_MESSAGE_MB.value << 20,
        download_max_bytes=_DL_MAX.value,
        download_timeout_s=_DL_TIMEOUT.value,
        download_stall_timeout_s=_DL_STALL.value,
        download_workers=_DL_WORKERS.value,
        download_allow_private=_DL_PRIVATE.value,
        download_allow_hosts=tuple(_DL_HOSTS.value),
        shutdown_grace_s=_GRACE.value,
        initial_pair_capacity=_PAIR_CAP.value,
        max_pair_capacity=_MAX_PAIRS.value,
        lidar_repeated_fields=_LIDAR_REPEATED.value,
        compilation_cache_dir=_COMPILE_CACHE.value or None,
        warmup_compiles=_WARMUP.value,
        warmup_height=_WARMUP_H.value,
        profiling_trace_dir=_TRACE_DIR.value,
        metrics_port=_METRICS_PORT.value,
        tls_cert_file=_TLS_CERT.value or None,
        tls_key_file=_TLS_KEY.value or None,
        tls_client_ca_file=_TLS_CLIENT_CA.value or None,
        auth_token_file=_TOKEN_FILE.value or None,
        allow_remote_shutdown=_REMOTE_SHUTDOWN.value,
        asset_dir=_ASSET_DIR.value or None,
        max_output_pixels=_MAX_OUT_PX.value,
        max_compiled_variants=_MAX_VARIANTS.value,
        devices=_DEVICES.value or None,
    )


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nurec_jax.server.app import Server

    options = options_from_flags()
    if options.artifact_glob is None:
        logging.warning("no --artifact-glob: only scenes registered with x-nre-scene-url can be served")
    try:
        server = Server(options)
        port = server.start()
    except (ValueError, OSError) as e:
        print(f"serve-grpc: {e}", file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        logging.info("received %s: shutting down gracefully", signal.Signals(signum).name)
        server.request_shutdown()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"serve-grpc: listening on {options.host}:{port} with {len(server.registry.ids())} scene(s)", flush=True)
    while not server.wait_for_termination(timeout=0.5):
        pass
    if server.warmup_error is not None:
        print(f"serve-grpc: a scene failed to load: {server.warmup_error}", file=sys.stderr)
        return 1
    return 0


def main():
    # Most ranges are checked by ServerOptions.validate (one line, exit 2); these two are not.
    _flags.run(
        _main,
        prog="serve-grpc",
        module_globals=globals(),
        groups=_help.SERVE_GRPC,
        multi={"difix_resolution": 2},
        ranges={"max_message_mb": _flags.AT_LEAST_1, "shutdown_grace_s": _flags.NON_NEGATIVE},
    )


if __name__ == "__main__":
    main()
