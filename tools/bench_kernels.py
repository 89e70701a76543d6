r"""Kernel benchmark: render forward and forward+backward, lidar spins, peak memory, compile time.

    python tools/bench_kernels.py [--scenes=sample,1000000,3000000] [--width=1920] [--height=1080]
        [--repeats=5] [--implementation=auto|reference|pallas] [--lidar=PANDAR128|AT128]

CPU smoke run (about 7 minutes on 2 CPU cores):

    python tools/bench_kernels.py --scenes=sample,20000 --width=320 --height=180 --repeats=1 \
        --lidar_column_stride=30

Scenes: "sample" is the bundled sample scene (117k Gaussians, with its actors); a number N is a
synthetic street of N static Gaussians (SH degree 0, fixed --seed) filling a box from 10 m behind
to 60 m ahead of the ego rig, 20 m wide and 8 m high, none within 3 m of the camera. Every scene is
seen by the sample scene's front FTheta camera (camera_front_wide_120fov, rolling shutter) at
recorded frame --frame, and by a lidar with the rig's axes at the camera centre, spinning from that
frame's start.

Figures, per scene (each time the median over --repeats after --warmup untimed runs):
  pairs        (tile, Gaussian) pairs of the frame (and its longest tile list): the compositor's
               work, so a reader sees that the frame was not empty.
  fwd ms       ms per frame of `nurec_jax.render.render` under jax.jit.
  fwd+bwd ms   ms per jax.grad of mean(rgb) w.r.t. the camera translation and the static Gaussian
               means (so the backward compositor runs).
  lidar ms     ms per spin of `nurec_jax.renderer.LidarCaster.cast` (--lidar, every
               --lidar_column_stride-th column), host copies of the result included; "returns" are
               rays with alpha > 0.8.
  peak MiB     the process's peak so far (it never goes down), printed after each measurement: the
               device's peak_bytes_in_use on GPU; where the device has no memory stats (CPU), the
               process's peak RSS, labelled as such.
  compile s    trace + lower + compile of the forward render of the first scene, in a child process:
               "cold" with an empty persistent compilation cache, "cached" in a second child that
               reads the cache the first one wrote.

GPU figures count only when measured on a GPU: on CPU the "auto" implementation is the jnp
reference compositor, and --implementation=pallas runs the kernels in interpret mode (correct but
very slow). The first output line names the JAX version, backend and device.
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import nurec_jax
from nurec_jax import cameras, lidar, lidar_models, sh
from nurec_jax import render as R
from nurec_jax import renderer as RR
from nurec_jax.poses import Pose, PosePair
from nurec_jax.server.app import enable_compilation_cache
from nurec_jax.types import Gaussians, SceneGaussians, Sky

_SCENES = flags.DEFINE_list(
    "scenes", ["sample", "1000000", "3000000"], '"sample" (the bundled scene) or a Gaussian count (synthetic street).'
)
_WIDTH = flags.DEFINE_integer("width", 1920, "Requested width (the camera's aspect is kept).")
_HEIGHT = flags.DEFINE_integer("height", 1080, "Requested height.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions after warm-up.", lower_bound=1)
_WARMUP = flags.DEFINE_integer(
    "warmup",
    2,
    "Untimed calls first: the first compiles; a second absorbs one-time retraces "
    "(Pallas registers a JAX config option while tracing its first kernel).",
    lower_bound=1,
)
_FRAME = flags.DEFINE_integer("frame", 30, "Recorded frame of the sample scene's front camera.")
_IMPLEMENTATION = flags.DEFINE_enum(
    "implementation", "auto", ["auto", "reference", "pallas"], "Compositor of the camera renderer and the lidar caster."
)
_LIDAR = flags.DEFINE_enum("lidar", "PANDAR128", sorted(lidar_models.DEVICES), "Lidar model.")
_LIDAR_COLUMN_STRIDE = flags.DEFINE_integer(
    "lidar_column_stride",
    1,
    "Cast every n-th lidar column only (less work on CPU; a divisor of the column count keeps a full spin).",
    lower_bound=1,
)
_LIDAR_RAY_CHUNK = flags.DEFINE_integer(
    "lidar_ray_chunk",
    1 << 62,
    "Most rays per lidar pass (the server's --ray-chunk-size; the default casts a spin in one pass).",
    lower_bound=1,
)
_MAX_PAIRS = flags.DEFINE_integer(
    "max_pair_capacity", 1 << 28, "Largest (tile, Gaussian) pair buffer a frame or lidar pass may use."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic scenes.")
_SKIP_GRAD = flags.DEFINE_bool("skip_grad", False, "Do not time forward+backward.")
_SKIP_LIDAR = flags.DEFINE_bool("skip_lidar", False, "Do not time lidar spins.")
_SKIP_COMPILE_PROBE = flags.DEFINE_bool("skip_compile_probe", False, "Do not time compilation (two child processes).")
_COMPILE_PROBE = flags.DEFINE_string(
    "compile_probe", "", "Internal: run as a compile-time probe with this persistent compilation cache directory."
)
_PROBE_CAPACITY = flags.DEFINE_integer("probe_capacity", 1 << 16, "Internal: pair capacity of the compile-time probe.")

_CAMERA = "camera_front_wide_120fov"
_STREET_LO = np.array([-10.0, -10.0, 0.0])  # rig frame at the frame's start: x fwd, y left, z up
_STREET_HI = np.array([60.0, 10.0, 8.0])
_CLEARANCE_M = 3.0  # no synthetic Gaussian this close to the camera
_FAILURES = (MemoryError, jax.errors.JaxRuntimeError, subprocess.CalledProcessError)


@dataclasses.dataclass(frozen=True)
class _View:
    """The sample scene's front camera at a recorded frame."""

    meta: nurec_jax.SceneMetadata
    camera: cameras.Camera
    pose: PosePair  # camera -> world over the exposure
    start_us: int
    end_us: int
    rig: np.ndarray  # rig -> world (4x4) at the exposure start
    mount: np.ndarray  # camera -> rig (4x4)


@dataclasses.dataclass
class _Row:
    scene: str
    gaussians: int
    size: str
    pairs: int | None = None
    fwd_ms: float | None = None
    grad_ms: float | None = None
    lidar_ms: float | None = None
    peak_mib: float | None = None


# ----------------------------------------------------------------------------------------------
# Scenes


def _view(meta: nurec_jax.SceneMetadata) -> _View:
    cal = meta.cameras[_CAMERA]
    s_us, e_us = (int(t) for t in cal.frame_timestamps_us[_FRAME.value])
    native = cameras.camera_from_intrinsics(cal.intrinsics)
    camera = cameras.camera_at_resolution(native, _WIDTH.value, _HEIGHT.value)
    return _View(
        meta,
        camera,
        RR.rig_camera_poses(meta, _CAMERA, s_us, e_us),
        s_us,
        e_us,
        meta.trajectory.pose_at(s_us),
        np.asarray(cal.T_sensor_rig),
    )


def _street_points(rng: np.random.Generator, n: int, camera_rig: np.ndarray) -> np.ndarray:
    """n points uniform in the street box (rig frame), none within _CLEARANCE_M of the camera."""
    pts = np.zeros((0, 3))
    while len(pts) < n:
        p = rng.uniform(_STREET_LO, _STREET_HI, (n, 3))
        pts = np.concatenate([pts, p[np.linalg.norm(p - camera_rig, axis=1) >= _CLEARANCE_M]])
    return pts[:n]


def _synthetic_scene(n: int, view: _View, seed: int) -> SceneGaussians:
    """n static Gaussians in a street around the view's rig: scales 0.05-0.5 m (log-uniform),
    opacities 0.05-0.95, random rotations and colours (SH degree 0), no actors, black sky."""
    rng = np.random.default_rng(seed)
    local = _street_points(rng, n, view.mount[:3, 3])
    means = local @ view.rig[:3, :3].T + view.rig[:3, 3]
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    scales = np.exp(rng.uniform(np.log(0.05), np.log(0.5), (n, 3)))
    opacities = rng.uniform(0.05, 0.95, n)
    dc = (rng.uniform(0.0, 1.0, (n, 1, 3)) - 0.5) / sh.C0
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    static = Gaussians(f32(means), f32(quats), f32(scales), f32(opacities), f32(dc), 0)
    empty = Gaussians(
        f32(np.zeros((0, 3))),
        f32(np.zeros((0, 4))),
        f32(np.zeros((0, 3))),
        f32(np.zeros(0)),
        f32(np.zeros((0, 1, 3))),
        0,
    )
    return SceneGaussians(
        static,
        jnp.zeros(n, jnp.int32),
        empty,
        jnp.zeros(0, jnp.int32),
        Sky(None, f32(np.zeros(3)), f32(np.eye(3))),
        ("synthetic",),
    )


def _scene(name: str, view: _View) -> SceneGaussians:
    if name == "sample":
        return nurec_jax.load_scene(nurec_jax.sample_scene_path()).gaussians
    return _synthetic_scene(int(name), view, _SEED.value)


# ----------------------------------------------------------------------------------------------
# Measurements


def _timed(fn):
    """(median ms over --repeats, the last warm-up's result) of fn(), waiting for its arrays."""
    for _ in range(_WARMUP.value):
        result = jax.block_until_ready(fn())
    times = []
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), result


def _peak_memory() -> tuple[str, float]:
    """(what, MiB): the process's peak memory so far, the device's where the device reports it."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return "peak device memory", stats["peak_bytes_in_use"] / 2**20
    # ru_maxrss is in KiB on Linux.
    return (
        "peak RSS of the host process (no device memory stats)",
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _render_options(gaussians: SceneGaussians, view: _View, actors) -> R.RenderOptions:
    """Capacities that hold this frame (found by one Renderer pass), with --implementation."""
    sizer = RR.Renderer(max_pair_capacity=_MAX_PAIRS.value)
    sizer.render(gaussians, view.camera, view.pose, actors, cache_key=("bench",))
    opts = sizer.options_for(view.camera, ("bench",))
    return dataclasses.replace(opts, implementation=_IMPLEMENTATION.value)


def _bench_forward(gaussians, view, actors) -> tuple[float, int, R.RenderOptions]:
    """(ms per frame, pairs, the options used)."""
    opts = _render_options(gaussians, view, actors)
    fn = jax.jit(R.render, static_argnames=("options",))
    ms, out = _timed(lambda: fn(gaussians, view.camera, view.pose, actors, options=opts))
    print(
        f"  forward: {ms:.1f} ms/frame, {int(out.num_pairs):,} pairs (longest tile "
        f"{int(out.max_tile_pairs):,}; pair capacity {opts.pair_capacity:,})",
        flush=True,
    )
    return ms, int(out.num_pairs), opts


def _image_loss(trans_delta, means, gaussians, camera, pose, actors, options):
    """mean(rgb) with the camera moved by `trans_delta` (world), static Gaussians at `means`."""

    def shift(p):
        return Pose(p.quat, p.trans + trans_delta)

    static = dataclasses.replace(gaussians.static, means=means)
    moved = PosePair(shift(pose.start), shift(pose.end))
    out = R.render(dataclasses.replace(gaussians, static=static), camera, moved, actors, options)
    return jnp.mean(out.rgb)


def _bench_grad(gaussians, view, actors, opts) -> float:
    fn = jax.jit(jax.grad(_image_loss, argnums=(0, 1)), static_argnames=("options",))
    delta = jnp.zeros(3, gaussians.static.means.dtype)
    means = gaussians.static.means
    ms, (d_trans, d_means) = _timed(lambda: fn(delta, means, gaussians, view.camera, view.pose, actors, options=opts))
    moved = int(jnp.sum(jnp.any(d_means != 0, axis=1)))
    print(
        f"  forward+backward: {ms:.1f} ms/frame (|d loss/d translation| "
        f"{float(jnp.linalg.norm(d_trans)):.2e}, {moved:,} means with a gradient)",
        flush=True,
    )
    return ms


def _lidar_model() -> lidar_models.LidarModel:
    model = lidar_models.DEVICES[_LIDAR.value]()
    columns = model.column_azimuths_rad[:: _LIDAR_COLUMN_STRIDE.value]
    return dataclasses.replace(model, column_azimuths_rad=columns)


def _bench_lidar(gaussians, view) -> float:
    model = _lidar_model()
    at_camera = np.eye(4)
    at_camera[:3, 3] = view.mount[:3, 3]
    t1 = view.start_us + int(1e6 / model.spin_frequency_hz)
    pose = PosePair.from_matrices(
        *(np.asarray(view.meta.trajectory.pose_at(t) @ at_camera, np.float32) for t in (view.start_us, t1))
    )
    actors = RR.track_actor_poses(view.meta, gaussians.track_ids, view.start_us, t1)
    caster = RR.LidarCaster(lidar.LidarOptions(implementation=_IMPLEMENTATION.value), _MAX_PAIRS.value)
    ms, alpha = _timed(lambda: caster.cast(gaussians, model, pose, actors, ray_chunk_size=_LIDAR_RAY_CHUNK.value).alpha)
    print(
        f"  lidar {model.name} ({model.rows}x{model.columns} = {model.rays_per_spin:,} rays): "
        f"{ms:.1f} ms/spin, {int(np.sum(alpha > 0.8)):,} returns",
        flush=True,
    )
    return ms


def _guarded(what: str, fn):
    """fn()'s result; a capacity, device-memory or child-process failure is printed, giving None."""
    try:
        return fn()
    except _FAILURES as e:
        child = isinstance(e, subprocess.CalledProcessError)
        detail = e.stderr.strip().splitlines()[-3:] if child else [str(e)]
        print(f"  {what} failed: {type(e).__name__}: {' | '.join(detail)[:500]}", flush=True)
        return None


def _measure(row: _Row, what: str, fn):
    """_guarded(what, fn), then the peak memory so far (printed, and kept in the row)."""
    result = _guarded(what, fn)
    if result is not None:
        label, row.peak_mib = _peak_memory()
        print(f"    {label}: {row.peak_mib:,.0f} MiB", flush=True)
    return result


def _bench_scene(name: str, view: _View) -> tuple[_Row, R.RenderOptions | None]:
    """The scene's row, and the render options its forward pass used (None if it failed)."""
    gaussians = _scene(name, view)
    count = gaussians.static.count + gaussians.dynamic.count
    row = _Row(name, count, f"{view.camera.width}x{view.camera.height}")
    print(f"scene {name}: {row.gaussians:,} Gaussians, {view.camera.model} {row.size}", flush=True)
    actors = RR.track_actor_poses(view.meta, gaussians.track_ids, view.start_us, view.end_us)
    opts = None
    forward = _measure(row, "forward", lambda: _bench_forward(gaussians, view, actors))
    if forward is not None:
        row.fwd_ms, row.pairs, opts = forward
    if opts is not None and not _SKIP_GRAD.value:
        row.grad_ms = _measure(row, "forward+backward", lambda: _bench_grad(gaussians, view, actors, opts))
    if not _SKIP_LIDAR.value:
        row.lidar_ms = _measure(row, "lidar", lambda: _bench_lidar(gaussians, view))
    return row, opts


# ----------------------------------------------------------------------------------------------
# Compile time in child processes


def _probe_child(scene: str, opts: R.RenderOptions, cache_dir: str) -> float:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        f"--scenes={scene}",
        f"--width={_WIDTH.value}",
        f"--height={_HEIGHT.value}",
        f"--frame={_FRAME.value}",
        f"--seed={_SEED.value}",
        f"--implementation={opts.implementation}",
        f"--compile_probe={cache_dir}",
        f"--probe_capacity={opts.pair_capacity}",
    ]
    # This process already holds most of the GPU in its preallocated pool.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(re.search(r"^compile_s=([0-9.]+)$", out, re.M).group(1))


def _compile_times(scene: str, opts: R.RenderOptions) -> tuple[float, float]:
    """(cold, cached) seconds to compile the forward render: two children, one fresh cache."""
    with tempfile.TemporaryDirectory(prefix="bench_kernels_cache_") as cache_dir:
        return _probe_child(scene, opts, cache_dir), _probe_child(scene, opts, cache_dir)


def _probe_main() -> None:
    """Child mode: prints compile_s=<seconds> of lower + compile of the forward render."""
    enable_compilation_cache(_COMPILE_PROBE.value, min_compile_time_s=0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    view = _view(nurec_jax.read_scene_metadata(nurec_jax.sample_scene_path()))
    gaussians = _scene(_SCENES.value[0], view)
    actors = RR.track_actor_poses(view.meta, gaussians.track_ids, view.start_us, view.end_us)
    opts = R.RenderOptions(pair_capacity=_PROBE_CAPACITY.value, implementation=_IMPLEMENTATION.value)
    fn = jax.jit(R.render, static_argnames=("options",))
    t0 = time.perf_counter()
    fn.lower(gaussians, view.camera, view.pose, actors, options=opts).compile()
    print(f"compile_s={time.perf_counter() - t0:.3f}")


# ----------------------------------------------------------------------------------------------
# Report


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_table(rows: list[_Row], compile_line: str | None) -> None:
    print(
        f"\nsummary: {jax.default_backend()} {jax.devices()[0].device_kind}, implementation "
        f"{_IMPLEMENTATION.value}, median of {_REPEATS.value}, lidar {_LIDAR.value}; "
        f"peak MiB = {_peak_memory()[0]} so far"
    )
    print(
        f"{'scene':<10} {'Gaussians':>10} {'size':>9} {'pairs':>11} {'fwd ms':>9} "
        f"{'fwd+bwd ms':>10} {'lidar ms':>9} {'peak MiB':>9}"
    )
    for r in rows:
        print(
            f"{r.scene:<10} {r.gaussians:>10,} {r.size:>9} {_fmt(r.pairs, ',d'):>11} "
            f"{_fmt(r.fwd_ms, '.1f'):>9} {_fmt(r.grad_ms, '.1f'):>10} "
            f"{_fmt(r.lidar_ms, '.1f'):>9} {_fmt(r.peak_mib, ',.0f'):>9}"
        )
    if compile_line:
        print(compile_line)


def _compile_line(scene: str, size: str, opts: R.RenderOptions) -> str | None:
    print(f"compile probe: forward render of {scene} at {size}, two child processes", flush=True)
    times = _guarded("compile probe", lambda: _compile_times(scene, opts))
    if times is None:
        return None
    line = f"compile forward {scene} {size}: cold {times[0]:.1f} s, with the persistent cache {times[1]:.1f} s"
    print(f"  {line}", flush=True)
    return line


def _main(argv) -> None:
    del argv
    if _COMPILE_PROBE.value:
        _probe_main()
        return
    dev = jax.devices()[0]
    print(
        f"JAX {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}, "
        f"implementation {_IMPLEMENTATION.value}",
        flush=True,
    )
    view = _view(nurec_jax.read_scene_metadata(nurec_jax.sample_scene_path()))
    results = [_bench_scene(name, view) for name in _SCENES.value]
    rows = [row for row, _ in results]
    first_opts = results[0][1]
    compile_line = None
    if not _SKIP_COMPILE_PROBE.value and first_opts is not None:
        compile_line = _compile_line(rows[0].scene, rows[0].size, first_opts)
    _print_table(rows, compile_line)


if __name__ == "__main__":
    app.run(_main)
