"""The jit boundary for rendering: compiled functions cached per static signature, capacities grown
on overflow, and helpers that pose cameras and actors from a scene's recorded trajectory and tracks.

`Renderer` (camera frames) and `LidarCaster` (lidar spins) are what the server and the CLIs use; both
keep their compiled functions in `COMPILED`, one bounded process-wide LRU of executables (one per
static signature and device, shared by every instance; evicted ones are freed), run each frame on the
device its scene's arrays are committed to (inputs follow the scene), keep the capacity bucket found per
(scene, sensor size) under a lock, and re-run a frame or pass that overflowed with the next sufficient
power-of-two bucket. Research code may call
`nurec_jax.render.render` or `nurec_jax.lidar.raycast_pass` directly under its own `jax.jit` / `jax.grad`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, ContextManager, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from nurec_jax import constants as C
from nurec_jax import math as nmath
from nurec_jax.cameras import Camera
from nurec_jax.lidar import LidarOptions, LidarSpin, column_tiles_for, lidar_tables, raycast_pass
from nurec_jax.lidar_models import LidarModel
from nurec_jax.metadata import SceneMetadata
from nurec_jax.poses import PosePair
from nurec_jax.ppisp import IspIndex
from nurec_jax.render import (
    ActorPoses,
    RenderOptions,
    RenderOutput,
    bin_frame,
    compose_frame,
    composite_frame,
    prepare_frame,
    render,
    tile_size_for,
)
from nurec_jax.types import SceneGaussians

_LOGGER = logging.getLogger(__name__)


class Stage(Protocol):
    """One timed stage (see `StageTimer`)."""

    def wait(self, value: Any) -> Any:
        """Returns `value`, first blocking on its device arrays if the timer measures device time."""


class StageTimer(Protocol):
    """What `Renderer.render(timer=...)` needs: `with timer.stage("compositing") as st: st.wait(out)`.
    The server's `nurec_jax.server.stage_timer.StageTimer` is one; `RecordingTimer` below is a minimal one."""

    def stage(self, name: str) -> ContextManager[Stage]:
        """A context manager that times stage `name`."""


class _Waiting:
    def wait(self, value):
        return jax.block_until_ready(value)


class RecordingTimer:
    """A `StageTimer` that waits for every stage and records its wall milliseconds in `ms` (for scripts)."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield _Waiting()
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


def grown_capacity(pair_capacity: int, pairs: int, max_pair_capacity: int, what: str = "frame") -> int:
    """The power-of-two pair bucket that holds `pairs` (never smaller than the current one). Raises
    MemoryError when it would exceed `max_pair_capacity`."""
    new_pairs = max(pair_capacity, nmath.next_pow2(pairs))
    if new_pairs > max_pair_capacity:
        raise MemoryError(f"{what} needs {pairs} tile/Gaussian pairs, above the limit {max_pair_capacity}")
    return new_pairs


class _Buckets:
    """The pair bucket each (scene, sensor size) key renders with, shared by a jit owner's threads: the
    first that worked is kept, an overflow grows it to the next sufficient power of two. The most
    recently used `max_keys` keys are remembered (clients choose sizes freely; a forgotten key starts
    again from its first bucket)."""

    def __init__(self, max_pair_capacity: int, what: str, max_keys: int = 4096):
        self.max_pair_capacity = max_pair_capacity
        self._what = what
        self._max_keys = max_keys
        self._caps: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, default=None):
        with self._lock:
            if key in self._caps:
                self._caps.move_to_end(key)
            return self._caps.get(key, default)

    def _set_locked(self, key: tuple, pairs: int) -> None:
        self._caps[key] = pairs
        self._caps.move_to_end(key)
        while len(self._caps) > self._max_keys:
            self._caps.popitem(last=False)

    def keep(self, key: tuple, pairs: int) -> None:
        """Records the bucket a frame rendered with, unless one is known already."""
        with self._lock:
            if key not in self._caps:
                self._set_locked(key, pairs)

    def grow(self, key: tuple, capacity: int, pairs: int) -> int:
        """The bucket after one that held `capacity` overflowed with `pairs` (MemoryError past the maximum)."""
        new_pairs = grown_capacity(capacity, pairs, self.max_pair_capacity, self._what)
        _LOGGER.info("%s capacity grown to %d pairs for %s", self._what, new_pairs, key)
        with self._lock:
            self._set_locked(key, new_pairs)
        return new_pairs


def counted_jit(fn, counter: list, **jit_kwargs):
    """`jax.jit(fn)` that adds 1 to `counter[0]` each time it traces (each trace is a compile). For code
    that jits a render function itself; the Renderer and LidarCaster go through `CompiledCache`."""

    def traced(*args, **kwargs):
        counter[0] += 1
        return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)


def _leaf_signature(x) -> Any:
    """What a compiled executable fixes about one argument leaf: shape, dtype and weak type (a Python
    scalar: its type, which jit turns into a weakly typed scalar)."""
    if isinstance(x, (bool, int, float, complex)):
        return type(x)
    return (tuple(x.shape), np.dtype(x.dtype), bool(getattr(x, "weak_type", False)))


def committed_device(x):
    """The device a committed single-device `jax.Array` lives on (where computations on it run), else None
    (numpy, Python scalars, arrays created without a device: they follow the computation)."""
    if isinstance(x, jax.Array) and x.committed:
        devices = x.devices()
        if len(devices) == 1:
            return next(iter(devices))
    return None


def on_scene_device(gaussians, inputs):
    """(device, inputs): a scene placed on one device (the server's `--devices`) has the call's other inputs
    put there too, so nothing is staged on device 0; otherwise (None, inputs) unchanged."""
    device = committed_device(gaussians.static.means)
    return device, (inputs if device is None else jax.device_put(inputs, device))


def _run_device(leaves):
    """The device a computation over `leaves` runs on: the first committed leaf's, else the default device
    in effect (the thread's `jax.default_device`, else the first device)."""
    for x in leaves:
        device = committed_device(x)
        if device is not None:
            return device
    default = jax.config.jax_default_device
    if isinstance(default, jax.Device):
        return default
    return jax.devices(default)[0] if isinstance(default, str) else jax.devices()[0]


class _Pending:
    """A compile in progress: other threads wanting the same signature wait for it."""

    def __init__(self):
        self.done = threading.Event()
        self.value = None


class CompiledCache:
    """A process-wide LRU of ahead-of-time compiled executables, keyed by static signature.

    `jax.jit` keeps every signature it ever compiled for the life of the process; a server asked for
    many output sizes then grows by one executable per size. Here each miss builds a fresh `jax.jit`
    wrapper around a fresh closure, lowers and compiles it once and keeps only the resulting `Compiled`
    object: once the wrapper goes out of scope nothing in jit's own caches refers to the executable, so
    evicting the entry (at most `max_entries`, least recently used first) frees it. The key is the
    function's name, the argument pytree structure (which holds the cameras' static fields), every
    leaf's shape / dtype / weak type, the static keyword values and the device the computation runs on
    (an executable is compiled for one device: with `--devices`, each device that renders a shape has
    its own entry, and the bound counts them all).

    Evicting also empties JAX's own tracing and lowering caches (`jax.clear_caches`, with
    `clear_jax_caches`): they are bounded LRUs of a few thousand entries each, but every new signature
    adds jaxprs for each `jnp` helper it traced (measured: ~3-10 MB per compile that stays until those
    LRUs fill, several hundred MB on the thinned sample scene). The executables this cache holds are not
    in those caches, so they survive; what other code jitted itself recompiles once.

    Two threads missing the same key compile it once (the second waits). Tracing counts into the
    counter the caller passes (`trace_count`); JAX's persistent compilation cache, when on, still
    serves the compile step of a signature that was evicted and comes back.
    """

    def __init__(self, max_entries: int = 16, clear_jax_caches: bool = True):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max = max_entries
        self.clear_jax_caches = clear_jax_caches
        self._entries: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._pending: dict[tuple, _Pending] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def max_entries(self) -> int:
        return self._max

    def resize(self, max_entries: int) -> None:
        """Sets the bound, evicting the least recently used entries beyond it."""
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        with self._lock:
            self._max = max_entries
            dropped = self._evict_locked()
        self._release(dropped)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(
                entries=len(self._entries),
                max_entries=self._max,
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
            )

    def clear(self) -> None:
        with self._lock:
            dropped = list(self._entries.values())
            self._entries.clear()
        self._release(dropped)

    def _release(self, dropped: list) -> None:
        """Frees evicted executables (outside the lock) and, if any, JAX's tracing caches."""
        if not dropped:
            return
        dropped.clear()
        if self.clear_jax_caches:
            jax.clear_caches()

    def _evict_locked(self) -> list:
        dropped = []
        while len(self._entries) > self._max:
            key, exe = self._entries.popitem(last=False)
            dropped.append(exe)
            self.evictions += 1
            _LOGGER.info("compiled-variant cache full (%d): dropped %s", self._max, key[0])
        return dropped

    @staticmethod
    def key(name: str, args: tuple, kwargs: dict, static: dict) -> tuple:
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        return (
            name,
            tree,
            tuple(_leaf_signature(x) for x in leaves),
            tuple(sorted(static.items())),
            _run_device(leaves),
        )

    def get(self, name: str, fn, counter: list, args: tuple, kwargs: dict | None = None, static: dict | None = None):
        """The executable of `fn(*args, **kwargs, **static)` (compiled on a miss; `static` are the
        static keyword arguments). Call it with `(*args, **kwargs)`, without the static ones."""
        kwargs, static = kwargs or {}, static or {}
        key = self.key(name, args, kwargs, static)
        while True:
            with self._lock:
                exe = self._entries.get(key)
                if exe is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return exe
                pending = self._pending.get(key)
                owner = pending is None
                if owner:
                    pending = self._pending[key] = _Pending()
                    self.misses += 1
            if not owner:
                pending.done.wait()
                if pending.value is not None:
                    return pending.value
                continue  # that compile failed: try ourselves
            try:
                exe = self._compile(fn, counter, args, kwargs, static)
                pending.value = exe
            finally:
                with self._lock:
                    del self._pending[key]
                    dropped = []
                    if pending.value is not None:
                        self._entries[key] = pending.value
                        dropped = self._evict_locked()
                pending.done.set()
            self._release(dropped)
            return exe

    @staticmethod
    def _compile(fn, counter: list, args: tuple, kwargs: dict, static: dict):
        def traced(*a, **kw):  # a new function object per compile: jit's caches die with it
            counter[0] += 1
            return fn(*a, **kw)

        wrapper = jax.jit(traced, static_argnames=tuple(static))
        return wrapper.lower(*args, **kwargs, **static).compile()

    def call(
        self,
        name: str,
        fn,
        counter: list,
        args: tuple,
        kwargs: dict | None = None,
        static: dict | None = None,
        check=None,
    ):
        """Runs `fn` through its cached executable; `check()` (if given) runs after a compile and before
        the run, and may raise to stop (a call whose deadline passed while it compiled)."""
        exe = self.get(name, fn, counter, args, kwargs, static)
        if check is not None:
            check()
        return exe(*args, **(kwargs or {}))


COMPILED = CompiledCache()
"""The process's compiled render and lidar functions (every Renderer and LidarCaster shares it; the
server sets its bound from --max-compiled-variants)."""

_TRACES = [0]
_STAGE_FUNCTIONS = {
    "projection": prepare_frame,
    "binning": bin_frame,
    "compositing": composite_frame,
    "compose": compose_frame,
}


class Renderer:
    """Renders frames with cached compiled functions and overflow-safe capacities.

    Capacities come from power-of-two buckets: a frame that needs more pairs than the current bucket is
    re-rendered with the next sufficient bucket, which is then kept for that (scene, resolution) so later
    frames start there. Nothing is ever silently clipped.
    """

    def __init__(
        self,
        base_options: RenderOptions = RenderOptions(pair_capacity=C.FIRST_PAIR_CAPACITY),
        max_pair_capacity: int = C.MAX_PAIR_CAPACITY,
    ):
        self.base_options = base_options
        self.max_pair_capacity = max_pair_capacity
        self._buckets = _Buckets(max_pair_capacity, "frame")

    @property
    def trace_count(self) -> int:
        """How many times a render function was traced (compiled) in this process. The compiled functions
        are shared by every Renderer, so a second instance reuses the first one's executables."""
        return _TRACES[0]

    @property
    def compiled_cache(self) -> CompiledCache:
        """The process-wide cache of compiled render and lidar functions (`COMPILED`)."""
        return COMPILED

    def _render_staged(self, gaussians, camera, sensor_pose, actors, options, timer, isp, check) -> RenderOutput:
        """`render` as four separately compiled stages, each timed (and waited for when the timer
        synchronizes): projection, binning, compositing, compose. Same result; for profiling. `check()`
        runs before each stage, so a call that gave up stops between them."""

        def stage(name, *args, **static):
            return COMPILED.call(name, _STAGE_FUNCTIONS[name], _TRACES, args, static=static, check=check)

        with timer.stage("projection") as st:
            prep = st.wait(stage("projection", gaussians, camera, sensor_pose, actors, options=options))
        with timer.stage("binning") as st:
            binning = st.wait(stage("binning", prep, camera, options=options))
        with timer.stage("compositing") as st:
            rgb, trans, hit = st.wait(stage("compositing", prep, binning, camera, options=options))
        with timer.stage("compose") as st:
            return st.wait(
                stage("compose", gaussians.sky, camera, prep, binning, rgb, trans, hit, gaussians.ppisp, isp)
            )

    @staticmethod
    def _key(camera: Camera, cache_key: tuple) -> tuple:
        return (cache_key, camera.width, camera.height)

    def first_capacity(self, camera: Camera, n_gaussians: int) -> int:
        """The first pair bucket for a (scene, resolution): sized from the scene and the image so the first
        frames do not grow (and recompile) it: 4 pairs per Gaussian at 640x360 with 8x8 tiles, a margin
        over the sample's 2.7 (320k pairs for 117k Gaussians); pairs grow with the pixel count as
        Gaussians span more tiles, and 4x with half the tile side. Never below `base_options.pair_capacity` nor above the maximum."""
        pixels = camera.width * camera.height / (640 * 360)
        tile = tile_size_for(self.base_options)
        estimate = C.FIRST_PAIRS_PER_GAUSSIAN * n_gaussians * max(1.0, pixels) * (8 / tile) ** 2
        return int(min(max(self.base_options.pair_capacity, nmath.next_pow2(int(estimate))), self.max_pair_capacity))

    def options_for(self, camera: Camera, cache_key: tuple = (), n_gaussians: int = 0) -> RenderOptions:
        """The options frames of this scene key and camera size render with: the bucket of the last frame
        rendered (grown where one overflowed), else the first bucket for `n_gaussians`. Code that jits
        `render` itself (gradients) takes its options from here after one `render`."""
        caps = self._buckets.get(self._key(camera, cache_key))
        if caps is None:
            caps = self.first_capacity(camera, n_gaussians)
        return dataclasses.replace(self.base_options, pair_capacity=caps)

    def render(
        self,
        gaussians: SceneGaussians,
        camera: Camera,
        sensor_pose: PosePair,
        actors: ActorPoses | None = None,
        *,
        disable_rolling_shutter: bool = False,
        cache_key: tuple = (),
        timer: StageTimer | None = None,
        isp: IspIndex | None = None,
        check=None,
    ) -> RenderOutput:
        """Renders a frame, growing the pair bucket on overflow. With a `timer` (any `StageTimer`) the frame
        runs as four separately compiled, timed stages. `isp` selects the camera and frame of the scene's
        PPISP post-processing (see `isp_index`); ignored for scenes without one. `check()` (if given) runs
        before each device run (after any compile, between stages, before an overflow re-render) and may
        raise to stop the frame (the server's deadline and cancellation check). A scene committed to one
        device (`jax.device_put`, as the server's `--devices` places scenes) renders on that device: the
        camera, poses and actors are put there too, and the compiled function is that device's."""
        key = self._key(camera, cache_key)
        n_gaussians = gaussians.static.count + gaussians.dynamic.count
        opts = dataclasses.replace(
            self.options_for(camera, cache_key, n_gaussians), disable_rolling_shutter=disable_rolling_shutter
        )
        if actors is None:
            actors = ActorPoses.hidden(len(gaussians.track_ids), gaussians.static.means.dtype)
        # One argument structure per scene kind, so every caller shares one compiled function.
        isp = None if gaussians.ppisp is None else (IspIndex.of() if isp is None else isp)
        _, (camera, sensor_pose, actors, isp) = on_scene_device(gaussians, (camera, sensor_pose, actors, isp))
        while True:
            if timer is None:
                out = COMPILED.call(
                    "render",
                    render,
                    _TRACES,
                    (gaussians, camera, sensor_pose, actors),
                    dict(isp=isp),
                    dict(options=opts),
                    check=check,
                )
            else:
                out = self._render_staged(gaussians, camera, sensor_pose, actors, opts, timer, isp, check)
            pairs = int(out.num_pairs)
            if pairs <= opts.pair_capacity:
                self._buckets.keep(key, opts.pair_capacity)  # later frames and `options_for` start there
                return out
            opts = dataclasses.replace(opts, pair_capacity=self._buckets.grow(key, opts.pair_capacity, pairs))


_LIDAR_TRACES = [0]


class LidarCaster:
    """Casts whole lidar spins (`nurec_jax.lidar`) in passes of column tiles, with the compiled pass
    shared by every caster and the pair bucket grown on overflow (the Renderer's rules)."""

    def __init__(self, options: LidarOptions = LidarOptions(), max_pair_capacity: int = C.MAX_PAIR_CAPACITY):
        self.options = options
        self.max_pair_capacity = max_pair_capacity
        self._buckets = _Buckets(max_pair_capacity, "lidar pass")

    @property
    def trace_count(self) -> int:
        """How many times the pass function was traced (compiled) in this process (shared by every
        caster, like the Renderer's)."""
        return _LIDAR_TRACES[0]

    def cast(
        self,
        gaussians: SceneGaussians,
        model: LidarModel,
        sensor_pose: PosePair,
        actors: ActorPoses | None = None,
        *,
        ray_chunk_size: int = 1 << 62,
        cache_key: tuple = (),
        check=None,
    ) -> LidarSpin:
        """Casts one spin in passes of `ray_chunk_size` rays at most; `check()` (if given) runs before
        each pass and may raise to stop early (cancellation)."""
        dtype = gaussians.static.means.dtype
        if actors is None:
            actors = ActorPoses.hidden(len(gaussians.track_ids), dtype)
        tables = lidar_tables(model, dtype)
        device, (tables, sensor_pose, actors) = on_scene_device(gaussians, (tables, sensor_pose, actors))
        n_ct = column_tiles_for(tables, ray_chunk_size)
        key = (cache_key, model.static_key(), n_ct)
        opts = dataclasses.replace(
            self.options, pair_capacity=self._buckets.get(key, self.options.pair_capacity), column_tiles=n_ct
        )
        parts = []
        c0 = 0
        while c0 < tables.column_tiles:
            if check is not None:
                check()
            first = jnp.int32(c0) if device is None else jax.device_put(np.int32(c0), device)
            out = COMPILED.call(
                "lidar_pass",
                raycast_pass,
                _LIDAR_TRACES,
                (gaussians, tables, sensor_pose, actors, first),
                static=dict(n_col_tiles=n_ct, options=opts),
                check=check,
            )
            pairs = int(out.num_pairs)
            if pairs > opts.pair_capacity:
                opts = dataclasses.replace(opts, pair_capacity=self._buckets.grow(key, opts.pair_capacity, pairs))
                continue  # redo this pass with the larger bucket
            parts.append(jax.tree_util.tree_map(np.asarray, (out.distance, out.alpha, out.intensity, out.points)))
            c0 += n_ct
        dist, alpha, inten, pts = (np.concatenate(x, axis=1)[:, : model.columns] for x in zip(*parts))
        order = np.asarray(tables.ring)[: model.rows]  # sorted position -> ring id
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        return LidarSpin(dist[inv], alpha[inv], inten[inv], pts[inv])


def track_actor_poses(
    metadata: SceneMetadata,
    track_ids: tuple[str, ...],
    start_us: int,
    end_us: int,
    overrides: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    dtype=np.float32,
) -> ActorPoses:
    """Actor poses at an exposure's start and end from the scene's tracks (interpolated).

    An actor is visible when its track exists at the exposure start (no extrapolation outside the
    track's time range) or when `overrides` (track id -> (T_start, T_end) object -> world 4x4) poses it.
    """
    starts, ends, vis = [], [], []
    overrides = overrides or {}
    for tid in track_ids:
        if tid in overrides:
            s, e = overrides[tid]
            starts.append(np.asarray(s, np.float64))
            ends.append(np.asarray(e, np.float64))
            vis.append(True)
            continue
        track = metadata.tracks.get(tid)
        if track is None:
            starts.append(np.eye(4))
            ends.append(np.eye(4))
            vis.append(False)
            continue
        starts.append(track.pose_at(start_us))
        ends.append(track.pose_at(end_us))
        vis.append(bool(track.is_present(start_us) or track.is_present(end_us)))
    if not track_ids:
        return ActorPoses.hidden(0, dtype)
    return ActorPoses(
        PosePair.from_matrices(np.stack(starts).astype(dtype), np.stack(ends).astype(dtype)), jnp.asarray(vis)
    )


def isp_index(
    metadata: SceneMetadata,
    camera_id: str | None,
    end_us: int,
    *,
    per_frame: bool = False,
    trajectory_idx: int | None = None,
) -> IspIndex:
    """The PPISP camera and frame of a render of camera `camera_id` (None: a camera the scene does not
    know) at exposure end `end_us`.

    Camera: the calibration's `unique_sensor_idx`, else its position in `camera_calibrations`.
    Frame (only when the scene enables per-frame PPISP): the camera's recorded frame whose exposure end
    is nearest `end_us`, numbered from the camera's `cameras_linear_start_frame_indices` entry; -1
    when that entry is missing. An unknown camera gets (-1, -1).
    """
    if camera_id is None:
        return IspIndex.of()
    try:
        cal = metadata.camera(camera_id, trajectory_idx)
    except KeyError:
        try:
            cal = metadata.camera(camera_id)
        except KeyError:
            return IspIndex.of()
    camera = cal.unique_sensor_idx if cal.unique_sensor_idx >= 0 else metadata.camera_list.index(cal)
    frame = -1
    windows = np.asarray(cal.frame_timestamps_us).reshape(-1, 2)
    if per_frame and cal.linear_start_frame_index >= 0 and len(windows):
        frame = cal.linear_start_frame_index + int(np.argmin(np.abs(windows[:, 1] - int(end_us))))
    return IspIndex.of(camera, frame)


def rig_camera_poses(
    metadata: SceneMetadata,
    camera_id: str,
    start_us: int,
    end_us: int,
    dtype=np.float32,
    trajectory_idx: int | None = None,
) -> PosePair:
    """Camera -> world at an exposure's start and end.

    The calibration is `metadata.camera(camera_id, trajectory_idx)` (None: the first of that logical
    id). When (start_us, end_us) is exactly one of its recorded frame windows and the file recorded
    the rig pose of that frame (`cameras_frame_T_rig_worlds`), those poses are used; otherwise the
    rig trajectory the camera belongs to is interpolated."""
    cal = metadata.camera(camera_id, trajectory_idx)
    frame = cal.recorded_frame(start_us, end_us) if cal.frame_T_rig_world is not None else None
    if frame is not None:
        rig_start, rig_end = cal.frame_T_rig_world[frame]
    else:
        trajectory = metadata.trajectory_of(cal)
        if trajectory is None:
            raise ValueError(f"scene {metadata.scene_id!r} has no ego trajectory")
        rig_start, rig_end = trajectory.pose_at(start_us), trajectory.pose_at(end_us)
    start = rig_start @ cal.T_sensor_rig
    end = rig_end @ cal.T_sensor_rig
    return PosePair.from_matrices(start.astype(dtype), end.astype(dtype))
