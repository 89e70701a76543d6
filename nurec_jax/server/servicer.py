"""`SensorsimServicer`: NuRec's SensorsimService on a grpc.aio server.

Handlers are thin coroutines: they hand the request to a thread pool (`--max-workers` render
threads per device, a few metadata threads), so the event loop keeps answering health, metadata and
new connections while a scene loads or a render function compiles. Renders on one device are serialised
by that device's lock (with `--devices`, scenes on different devices render at the same time); a client
that cancels or passes its deadline stops its own queued work.
Every error goes through `errors.status_of`, one mapping for all RPCs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.metadata
import logging
import os
import subprocess
import threading
import time
import traceback

import grpc
import numpy as np

from nurec_jax import assets
from nurec_jax._proto import common_pb2, sensorsim_pb2, sensorsim_pb2_grpc
from nurec_jax._proto.nurec import sensorsim_pb2 as nurec_sensorsim_pb2
from nurec_jax.metadata import SceneMetadata
from nurec_jax.renderer import LidarCaster, Renderer, isp_index
from nurec_jax.server import convert, images, metrics, requests
from nurec_jax.server import request_errors as errs
from nurec_jax.server.ego_masks import EgoMasks
from nurec_jax.server.options import ServerOptions
from nurec_jax.server.profiler import Profiler
from nurec_jax.server.registry import SceneRegistry
from nurec_jax.server.scene_cache import SceneCache, device_name
from nurec_jax.server.scene_editor import EditError, SceneEditor, describe
from nurec_jax.server.stage_timer import StageTimer
from nurec_jax.server.timing_log import TimingLog
from nurec_jax.server.warmup import WarmupStatus

_LOGGER = logging.getLogger(__name__)

API_VERSION = (0, 0, 1)  # NRE's grpc_api_version; clients compare replicas, not values
SCENE_URL_KEY = "x-nre-scene-url"
SCENE_ID_KEY = "x-nre-scene-id"
_WAIT_MARGIN_S = 0.25  # answer UNAVAILABLE this long before the client's deadline when a scene is loading


@functools.lru_cache(maxsize=1)
def version_id() -> common_pb2.VersionId:
    """Package version, git hash of the source tree (or "unknown"), API version 0.0.1."""
    try:
        version = importlib.metadata.version("nurec-jax")
    except importlib.metadata.PackageNotFoundError:
        from nurec_jax import __version__ as version
    git_hash = "unknown"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(root, ".git")):
        try:
            git_hash = (
                subprocess.run(
                    ["git", "-C", root, "rev-parse", "--short", "HEAD"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout.strip()
                or "unknown"
            )
        except (OSError, subprocess.SubprocessError):
            pass
    major, minor, patch = API_VERSION
    return common_pb2.VersionId(
        version_id=version,
        git_hash=git_hash,
        grpc_api_version=common_pb2.VersionId.APIVersion(major=major, minor=minor, patch=patch),
    )


class _Call:
    """Per-call cancellation flag and deadline, checked by the worker between stages."""

    def __init__(self, remaining_s: float | None, timer: StageTimer | None = None):
        self.cancelled = threading.Event()
        self.deadline = None if remaining_s is None else time.monotonic() + remaining_s
        self.timer = timer or StageTimer(enabled=False)
        self.device = None  # the device of the scene instance in use (set by `_scene`; None: the default)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise errs.Cancelled("the client cancelled the call")
        left = self.remaining()
        if left is not None and left <= 0:
            raise errs.DeadlineExceeded("the call's deadline passed before the work started")


@dataclasses.dataclass
class Stats:
    """Request counters (exposed in get_server_config under `stats.*` and on /metrics)."""

    responses: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (method, code)
    latency: metrics.LatencyHistogram = dataclasses.field(default_factory=metrics.LatencyHistogram)  # all-time
    renders: int = 0
    skipped_cancelled: int = 0
    latencies_s: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=2048))
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Counts a call by RPC and by status code; only successful renders enter the latency figures
        (a refused request answers in microseconds and would pull the percentiles down)."""
        with self.lock:
            self.responses[(method, code.name)] += 1
            if code == grpc.StatusCode.OK and method in metrics.RENDER_METHODS:
                self.latencies_s.append(seconds)
                self.latency.observe(seconds)

    @property
    def requests(self) -> collections.Counter:
        """Calls per RPC (every call is answered once, so these are `responses` summed over codes)."""
        return _sum_by(self.responses, 0)

    @property
    def status(self) -> collections.Counter:
        """Answers per status code name (`responses` summed over RPCs)."""
        return _sum_by(self.responses, 1)


def _sum_by(counts: collections.Counter, position: int) -> collections.Counter:
    out = collections.Counter()
    for key, n in counts.items():
        out[key[position]] += n
    return out


def scene_report_strings(scene) -> dict[str, str]:
    """What loading a resident scene read, approximated and skipped, as `scenes.<id>.*` config keys."""
    r, key = scene.report, f"scenes.{scene.scene_id}"
    out = {f"{key}.sources": ", ".join(r.sources), f"{key}.layers": ", ".join(f"{l.name}:{l.count}" for l in r.layers)}
    if r.post_processing:
        out[f"{key}.post_processing"] = r.post_processing
    approximated = [l.approximation for l in r.layers if l.approximation]
    if approximated:
        out[f"{key}.approximated"] = "; ".join(approximated)
    if r.skipped_layers:
        out[f"{key}.skipped_layers"] = ", ".join(r.skipped_layers)
    if r.warnings:
        out[f"{key}.warnings"] = "; ".join(r.warnings)
    return out


class UndecodableRequest:
    """Stands in for a request whose bytes did not parse: grpc.aio parses before the handler runs and
    answers a parse failure with UNKNOWN, so the parser hands this to the handler instead, which
    answers INVALID_ARGUMENT naming the RPC."""

    def __init__(self, type_name: str, error: BaseException):
        self.type_name = type_name
        self.error = error

    def message(self, method: str) -> str:
        return (
            f"{method}: the request is not a valid {self.type_name} message "
            f"({type(self.error).__name__}: {str(self.error)[:200]})"
        )


def _tolerant(deserialize, type_name: str):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or anything else the parser raises
            return UndecodableRequest(type_name, e)

    return parse


# The service's full names: NRE's package and NuRec 26.x's rename (same messages, same wire bytes).
_SERVICES = tuple(m.DESCRIPTOR.services_by_name["SensorsimService"] for m in (sensorsim_pb2, nurec_sensorsim_pb2))
SERVICE_NAMES = tuple(service.full_name for service in _SERVICES)


def add_to_server(servicer, server) -> None:
    """Registers SensorsimService like the generated `add_SensorsimServiceServicer_to_server` (which it
    calls, so the generated code stays the one list of RPCs), under both of its names (`SERVICE_NAMES`:
    a client generated from NRE's protos and one from NuRec 26.x's renamed protos call different paths
    with identical bytes), with request parsers that pass undecodable bytes on to the handler as an
    `UndecodableRequest`."""

    class _Registrar:
        registered = False

        def add_generic_rpc_handlers(self, handlers):
            pass  # replaced below by one built from the wrapped handlers

        def add_registered_method_handlers(self, name, handlers):
            for service in _SERVICES:
                wrapped = {
                    m: h._replace(
                        request_deserializer=_tolerant(
                            h.request_deserializer, service.methods_by_name[m].input_type.full_name
                        )
                    )
                    for m, h in handlers.items()
                }
                server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, wrapped),))
                server.add_registered_method_handlers(service.full_name, wrapped)
            self.registered = True

    registrar = _Registrar()
    sensorsim_pb2_grpc.add_SensorsimServiceServicer_to_server(servicer, registrar)
    if not registrar.registered:  # pragma: no cover - a grpcio whose generated code registers otherwise
        raise RuntimeError("SensorsimService registration did not pass through add_registered_method_handlers")


def _rpc(pool: str):
    """Runs a synchronous handler body in the named pool with error mapping and cancellation."""

    def deco(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            return await self._handle(fn, pool, request, context)

        return handler

    return deco


class SensorsimServicer(sensorsim_pb2_grpc.SensorsimServiceServicer):
    def __init__(
        self,
        options: ServerOptions,
        registry: SceneRegistry,
        scene_cache: SceneCache,
        renderer: Renderer,
        ego_masks: EgoMasks,
        lidar_caster: LidarCaster | None = None,
        timing_log: TimingLog | None = None,
        profiler: Profiler | None = None,
        postprocessor=None,
    ):
        self.options = options
        self.timing_log = timing_log or TimingLog("NONE")
        self.profiler = profiler
        self.postprocessor = postprocessor  # the --enable-difix post-pass (postprocess.PostProcessor) or None
        self.compile_cache = metrics.compile_cache_counters()
        # DETAILS timing splits camera renders into separately compiled projection / binning / compositing /
        # compose stages (extra compiles; for profiling, not production serving).
        self._staged_timing = options.enable_timing and options.timing_verbosity == "DETAILS"
        self.lidar_caster = lidar_caster or LidarCaster()
        self.registry = registry
        self.scene_cache = scene_cache
        self.renderer = renderer
        self.ego_masks = ego_masks
        self.editor = SceneEditor(registry, asset_dir=options.asset_dir)
        self.stats = Stats()
        self.warmup = WarmupStatus()
        # One lock per device (--devices): renders on one device are serialised, renders of scenes on
        # different devices run at once. `device_lock` is the first (without --devices: the only) one.
        self.device_locks = {device: threading.Lock() for device in scene_cache.devices}
        self.device_lock = self.device_locks[scene_cache.devices[0]]
        self.device_trace: list | None = None  # tests: a list gets (device name, enter, exit) per device section
        self.device_hook = None  # tests: called with the device on entering a device section
        # --max-workers render threads per device, so that a device is never idle for want of a thread.
        self.render_pool = concurrent.futures.ThreadPoolExecutor(
            options.max_workers * len(scene_cache.devices), thread_name_prefix="render"
        )
        self.meta_pool = concurrent.futures.ThreadPoolExecutor(options.metadata_threads, thread_name_prefix="meta")
        self.shutting_down = False
        self.on_shut_down = None  # set by the app: called after the shut_down reply is sent

    def close(self) -> None:
        self.render_pool.shutdown(wait=False, cancel_futures=True)
        self.meta_pool.shutdown(wait=False, cancel_futures=True)
        self.registry.close()  # stops scene downloads in progress

    # ----------------------------------------------------------------------------------------
    # Plumbing

    async def _handle(self, fn, pool: str, request, context):
        method = fn.__name__
        start = time.perf_counter()
        timed = pool == "render" and (self.options.enable_timing or self.options.metrics_output_dir is not None)
        call = _Call(
            context.time_remaining(),
            StageTimer(enabled=timed, synchronize=self.options.timing_synchronize, profiler=self.profiler),
        )
        # Fires when the RPC ends for any reason (client cancel, deadline, reply sent); queued or
        # waiting work of a finished call is then skipped.
        context.add_done_callback(lambda _ctx: call.cancelled.set())
        headers = {m.key: m.value for m in (context.invocation_metadata() or ())}
        executor = self.render_pool if pool == "render" else self.meta_pool
        loop = asyncio.get_running_loop()
        if isinstance(request, UndecodableRequest):
            message = request.message(method)
            _LOGGER.info("%s -> INVALID_ARGUMENT: %s", method, message)
            self.stats.record(method, grpc.StatusCode.INVALID_ARGUMENT, time.perf_counter() - start)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        try:
            if pool == "render" and self.shutting_down:
                raise errs.Unavailable("the server is shutting down")
            await self._scene_from_headers(headers, call)
            reply = await loop.run_in_executor(executor, self._run, fn, request, call, headers)
        except asyncio.CancelledError:
            call.cancelled.set()
            self.stats.record(method, grpc.StatusCode.CANCELLED, time.perf_counter() - start)
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            code, message = errs.status_of(e)
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                _LOGGER.error("%s failed", method, exc_info=e)
            else:
                _LOGGER.info("%s -> %s: %s", method, code.name, message)
            self.stats.record(method, code, time.perf_counter() - start)
            # The worker frames of a failed call may hold large buffers (a scene that failed to load); a
            # kept reference to the error (a waiter, a log handler) must not keep them alive.
            traceback.clear_frames(e.__traceback__)
            await context.abort(code, message)
        self.stats.record(method, grpc.StatusCode.OK, time.perf_counter() - start)
        if timed:
            self.timing_log.add(method, getattr(request, "scene_id", ""), call.timer.record(), call.timer.total_ms())
        return reply

    async def _scene_from_headers(self, headers: dict, call: _Call) -> None:
        """Registers the scene named by the x-nre-scene-url / -id metadata, awaiting its download.

        The download runs on the download cache's own threads; this call only awaits it, so a slow
        download holds no metadata or render worker. When the client cancels or its deadline passes the
        wait is released, and a download nobody waits for any more stops."""
        url, sid = headers.get(SCENE_URL_KEY), headers.get(SCENE_ID_KEY)
        if url is None and sid is None:
            return
        if url is None:
            raise errs.InvalidArgument(f"{SCENE_ID_KEY} was sent without {SCENE_URL_KEY}")
        if sid is None:
            raise errs.InvalidArgument(f"{SCENE_URL_KEY} was sent without {SCENE_ID_KEY}")
        pending = self.registry.request(sid, url)  # checks only; never blocks on the network
        if pending is None:
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(pending.future), call.remaining())
        except asyncio.TimeoutError:
            raise errs.DeadlineExceeded(
                f"{SCENE_URL_KEY}: the call's deadline passed while scene {errs.quoted(sid)} was downloading"
            ) from None
        finally:
            pending.release()

    def _run(self, fn, request, call: _Call, headers: dict):
        return fn(self, request, call)

    def _wait_timeout(self, call: _Call) -> float | None:
        left = call.remaining()
        return None if left is None else max(0.0, left - _WAIT_MARGIN_S)

    def _meta(self, scene_id: str, field: str = "scene_id") -> SceneMetadata:
        """The scene's metadata, with its actor edits."""
        if not scene_id:
            raise errs.InvalidArgument(f"{field}: empty")
        errs.check_id(scene_id, field)
        return self.editor.metadata(scene_id)

    @contextlib.contextmanager
    def _scene(self, scene_id: str, call: _Call):
        """The loaded scene, as edited (waits for a load until shortly before the call's deadline); the
        instance's device is noted in `call.device` for `_on_device`."""
        with self.scene_cache.use_instance(scene_id, self._wait_timeout(call)) as instance:
            call.device = instance.device
            yield self.editor.view(scene_id, instance.scene)

    @contextlib.contextmanager
    def _on_device(self, call: _Call):
        """Holds the device of the call's scene instance for one render; a call cancelled or expired while it
        waited is skipped, and one that gives up during the render is stopped at the next check (after a
        compile, between stages and lidar passes). Both count in `skipped_cancelled`."""
        with self.device_locks.get(call.device, self.device_lock):
            try:
                call.check()
            except errs.RequestError:
                with self.stats.lock:
                    self.stats.skipped_cancelled += 1
                raise
            entered = time.perf_counter()
            try:
                if self.device_hook is not None:
                    self.device_hook(call.device)
                yield
            except errs.Cancelled:  # DeadlineExceeded too
                with self.stats.lock:
                    self.stats.skipped_cancelled += 1
                raise
            finally:
                if self.device_trace is not None:
                    self.device_trace.append((device_name(call.device), entered, time.perf_counter()))
        with self.stats.lock:
            self.stats.renders += 1

    def _render_job(self, scene, job: requests.RGBJob, meta: SceneMetadata, call: _Call) -> bytes:
        """Render -> optional post-pass (--enable-difix) -> ego hood -> encode (docs/wire.md#rgb-requests)."""
        return self._finish_job(self._render_pixels(scene, job, meta, call), job, call)

    def _render_pixels(self, scene, job: requests.RGBJob, meta: SceneMetadata, call: _Call) -> np.ndarray:
        """The device part of a job: the render and the optional post-pass, as a host image."""
        timer = call.timer
        with timer.stage("setup"):
            actors = requests.job_actor_poses(meta, scene.gaussians.track_ids, job)
            isp = None
            if scene.gaussians.ppisp is not None:  # the named camera's PPISP curve (none for a novel camera)
                isp = isp_index(
                    meta,
                    job.logical_id or None,
                    job.end_us,
                    per_frame=scene.report.ppisp_per_frame,
                    trajectory_idx=job.trajectory_idx,
                )
        with self._on_device(call):
            with timer.stage("render") as st:
                out = st.wait(
                    self.renderer.render(
                        scene.gaussians,
                        job.camera,
                        job.sensor_pose,
                        actors,
                        cache_key=(meta.scene_id,),
                        isp=isp,
                        timer=timer if self._staged_timing else None,
                        check=call.check,
                    )
                )
                rgb = np.asarray(out.rgb)
            if self.postprocessor is not None:
                call.check()
                with timer.stage("postprocess"):
                    rgb = self.postprocessor(rgb)
        return rgb

    def _finish_job(self, rgb: np.ndarray, job: requests.RGBJob, call: _Call) -> bytes:
        """The host part of a job: ego hood and encoding."""
        timer = call.timer
        if job.ego_mask is not None:
            with timer.stage("ego_mask"):
                rgb = self.ego_masks.composite(rgb, *job.ego_mask)
        with timer.stage("encode"):
            return images.encode(rgb, job.image_format, job.image_quality)

    def _prepare(self, meta: SceneMetadata, request, prefix: str = "") -> requests.RGBJob:
        job = requests.prepare_rgb(
            meta,
            request,
            editing_enabled=self.options.enable_editing_actors,
            prefix=prefix,
            max_output_pixels=self.options.max_output_pixels,
        )
        if job.ego_mask is not None and not self.ego_masks.rig_exists(job.ego_mask[0]):
            raise errs.NotFound(
                f"{prefix}ego_mask_id.rig_config_id: no ego masks for rig {errs.quoted(job.ego_mask[0])}"
            )
        return job

    # ----------------------------------------------------------------------------------------
    # Rendering

    @_rpc("render")
    def render_rgb(self, request, call):
        with call.timer.stage("decode_request"):
            meta = self._meta(request.scene_id)
            job = self._prepare(meta, request)
        call.check()
        with self._scene(request.scene_id, call) as scene:
            return sensorsim_pb2.RGBRenderReturn(image_bytes=self._render_job(scene, job, meta, call))

    @_rpc("render")
    def batch_render_rgb(self, request, call):
        if not request.items:
            return sensorsim_pb2.BatchRGBRenderReturn()
        # A batch renders one scene, the first item's; an item naming another fails alone, like any bad item.
        scene_id = request.items[0].request.scene_id
        meta = self._meta(scene_id, "items[0].request.scene_id")
        results = []

        def fail(out, e):
            out.success = False
            out.error_message = errs.batch_error_message(e)
            out.ClearField("result")

        # Items render one after another on the device; each finished image is encoded on a host thread
        # while the next renders (encoding a 1080p JPEG costs about as much as rendering it on a GPU).
        with (
            self._scene(scene_id, call) as scene,
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode") as encoder,
        ):
            pending = []
            for i, item in enumerate(request.items):
                call.check()
                out = sensorsim_pb2.BatchRGBRenderReturnItem(camera_name=item.camera_name)
                results.append(out)
                try:
                    if item.request.scene_id != scene_id:
                        raise errs.InvalidArgument(
                            f"items[{i}].request.scene_id: {errs.quoted(item.request.scene_id)} differs from "
                            f"items[0]'s {errs.quoted(scene_id)}; a batch renders one scene"
                        )
                    job = self._prepare(meta, item.request, f"items[{i}].request.")
                    rgb = self._render_pixels(scene, job, meta, call)
                    pending.append((out, encoder.submit(self._finish_job, rgb, job, call)))
                except errs.Cancelled:
                    raise
                except Exception as e:  # noqa: BLE001 - one bad item never fails the others
                    fail(out, e)
            for out, fut in pending:
                try:
                    out.result.image_bytes = fut.result()
                    out.success = True
                except Exception as e:  # noqa: BLE001
                    fail(out, e)
        return sensorsim_pb2.BatchRGBRenderReturn(items=results)

    def _cast_lidar(self, scene, job: requests.LidarJob, meta: SceneMetadata, call: _Call):
        timer = call.timer
        with timer.stage("setup"):
            actors = requests.job_actor_poses(meta, scene.gaussians.track_ids, job)
        with self._on_device(call), timer.stage("render"):
            spin = self.lidar_caster.cast(
                scene.gaussians,
                job.model,
                job.sensor_pose,
                actors,
                ray_chunk_size=self.options.ray_chunk_size,
                cache_key=(meta.scene_id,),
                check=call.check,
            )
        with timer.stage("encode"):
            points, intensities, rings = spin.returns(job.model, job.opacity_threshold, job.distance_filter)
            return convert.lidar_return(points, intensities, rings, self.options.lidar_repeated_fields)

    @_rpc("render")
    def render_lidar(self, request, call):
        with call.timer.stage("decode_request"):
            meta = self._meta(request.scene_id)
            job = requests.prepare_lidar(meta, request, editing_enabled=self.options.enable_editing_actors)
        call.check()
        with self._scene(request.scene_id, call) as scene:
            return self._cast_lidar(scene, job, meta, call)

    @_rpc("render")
    def render_aggregated(self, request, call):
        """Every RGB request, then every lidar request, in order (docs/wire.md#aggregated-render)."""
        rgb_returns, lidar_returns = [], []
        for i, req in enumerate(request.rgb_requests):
            call.check()
            meta = self._meta(req.scene_id, f"rgb_requests[{i}].scene_id")
            job = self._prepare(meta, req, f"rgb_requests[{i}].")
            with self._scene(req.scene_id, call) as scene:
                rgb_returns.append(sensorsim_pb2.RGBRenderReturn(image_bytes=self._render_job(scene, job, meta, call)))
        for i, req in enumerate(request.lidar_requests):
            call.check()
            meta = self._meta(req.scene_id, f"lidar_requests[{i}].scene_id")
            job = requests.prepare_lidar(
                meta, req, editing_enabled=self.options.enable_editing_actors, prefix=f"lidar_requests[{i}]."
            )
            with self._scene(req.scene_id, call) as scene:
                lidar_returns.append(self._cast_lidar(scene, job, meta, call))
        return sensorsim_pb2.AggregatedRenderReturn(rgb_returns=rgb_returns, lidar_returns=lidar_returns)

    # ----------------------------------------------------------------------------------------
    # Metadata (from the scene file; nothing is loaded onto the device)

    @_rpc("meta")
    def get_version(self, request, call):
        return version_id()

    def snapshot(self) -> dict:
        """Server health counters (the /metrics endpoint's and get_server_config's `stats.*` source)."""
        with self.stats.lock:
            snap = dict(
                requests=dict(self.stats.requests),
                status=dict(self.stats.status),
                responses=dict(self.stats.responses),
                latency_histogram=self.stats.latency.collect(),
                latency_s=list(self.stats.latencies_s),
                renders=self.stats.renders,
                skipped_cancelled=self.stats.skipped_cancelled,
            )
        cache = self.compile_cache.snapshot()
        snap.update(
            scenes_loaded=[s.scene_id for s in self.scene_cache.loaded()],
            compiles=self.renderer.trace_count + self.lidar_caster.trace_count,
            compile_cache=dict(hits=cache["hits"], misses=cache["misses"]),
            warmup_state=self.warmup.state,
            edited_scenes=self.editor.edited_scene_ids(),
        )
        return snap

    @_rpc("meta")
    def get_server_config(self, request, call):
        """Every setting (NRE keys) plus `stats.*` health counters and `warmup.*` (BUILD_NOTES.md)."""
        config = self.options.as_strings()
        snap = self.snapshot()
        for key in ("renders", "requests", "status", "skipped_cancelled", "scenes_loaded", "compiles", "edited_scenes"):
            config[f"stats.{key}"] = str(snap[key])
        config["stats.compile_cache_hits"] = str(snap["compile_cache"]["hits"])
        config["stats.compile_cache_misses"] = str(snap["compile_cache"]["misses"])
        variants = self.renderer.compiled_cache.stats()  # Bounded work (nurec-jax): the process-wide LRU
        config["stats.compiled_variants"] = str(variants["entries"])
        config["stats.compiled_variant_evictions"] = str(variants["evictions"])
        lat = np.asarray(snap["latency_s"])
        if lat.size:
            config["stats.render_latency_p50_s"] = f"{np.percentile(lat, 50):.4f}"
            config["stats.render_latency_p95_s"] = f"{np.percentile(lat, 95):.4f}"
        if self.options.enable_timing:
            for method, stages in self.timing_log.summary().items():
                for stage, st in stages.items():
                    config[f"timing.{method}.{stage}.p50_ms"] = f"{st['p50_ms']:.3f}"
        config.update(self.warmup.as_strings())
        for scene in self.scene_cache.resident():
            config.update(scene_report_strings(scene))
        # Several accelerators (nurec-jax): the devices in use and where each resident scene's instances live.
        config["placement.devices"] = ",".join(device_name(d) for d in self.scene_cache.devices)
        for scene_id, devices in self.scene_cache.placement().items():
            config[f"placement.scene.{scene_id}"] = ",".join(device_name(d) for d in devices)
        return sensorsim_pb2.ServerConfig(server_config=config)

    @_rpc("meta")
    def get_available_scenes(self, request, call):
        return common_pb2.AvailableScenesReturn(scene_ids=self.registry.ids())

    @_rpc("meta")
    def get_loaded_scenes(self, request, call):
        # One instance per device the scene is on (--max-backends-per-scene: up to that many); an instance
        # serves every request for its scene, so each is reusable. Capacity: --cache-size on every device.
        entries = [
            sensorsim_pb2.LoadedSceneEntry(
                scene_id=s.scene_id, loaded_instance_count=s.instances, reusable_instance_count=s.instances
            )
            for s in self.scene_cache.loaded()
        ]
        return sensorsim_pb2.LoadedScenesReturn(
            scenes=entries, loaded_instance_capacity=self.scene_cache.total_capacity
        )

    async def shut_down(self, request, context):
        # Only callers on this machine may stop the server (render-grpc --shutdown-server-on-completion
        # runs next to it), unless --allow-remote-shutdown. The peer is only known here, on the loop.
        from nurec_jax.server.auth import is_loopback_peer

        peer = context.peer()
        if not (self.options.allow_remote_shutdown or is_loopback_peer(peer)):
            _LOGGER.warning("shut_down refused for remote peer %r", peer)
            self.stats.record("shut_down", grpc.StatusCode.PERMISSION_DENIED, 0.0)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "shut_down: only loopback peers may stop this server (start it with "
                "--allow-remote-shutdown to accept remote peers)",
            )

        def shut_down(servicer, request, call):  # the name is the RPC's, for stats
            _LOGGER.info("shut_down requested by %s", peer)
            if servicer.on_shut_down is not None:
                servicer.on_shut_down()
            return common_pb2.Empty()

        return await self._handle(shut_down, "meta", request, context)

    @_rpc("meta")
    def get_available_cameras(self, request, call):
        meta = self._meta(request.scene_id)
        # Every calibration (one per camera and trajectory), each with its trajectory's index.
        return sensorsim_pb2.AvailableCamerasReturn(
            available_cameras=[convert.available_camera(cal) for cal in meta.camera_list]
        )

    @_rpc("meta")
    def get_available_trajectories(self, request, call):
        meta = self._meta(request.scene_id)
        out = sensorsim_pb2.AvailableTrajectoriesReturn()
        if meta.trajectory is not None:
            for idx, traj in enumerate(meta.trajectories):  # trajectory_idx = index in rig_trajectories.json
                out.available_trajectories.add(
                    trajectory_idx=idx, trajectory=convert.trajectory_to_proto(traj.timestamps_us, traj.T_rig_world)
                )
        return out

    @_rpc("meta")
    def get_available_ego_masks(self, request, call):
        Meta = sensorsim_pb2.AvailableEgoMasksReturn.EgoMaskMetadata
        return sensorsim_pb2.AvailableEgoMasksReturn(
            ego_mask_metadata=[
                Meta(ego_mask_id=sensorsim_pb2.EgoMaskId(camera_logical_id=cam, rig_config_id=rig))
                for rig, cam in self.ego_masks.available()
            ]
        )

    @_rpc("meta")
    def get_external_asset_objects(self, request, call):
        meta = self._meta(request.scene_id)
        return sensorsim_pb2.ExternalAssetObjectsReturn(track_ids=assets.bank_ids(meta.members))

    @_rpc("meta")
    def get_dynamic_objects(self, request, call):
        meta = self._meta(request.scene_id)
        edits = self.editor.edits(request.scene_id)
        out = sensorsim_pb2.AvailableDynamicObjectsReturn()
        for t in meta.tracks.values():
            if not t.is_controllable:
                continue
            out.dynamic_objects.add(
                id=t.track_id,
                semantic_class=t.label,
                trajectory=convert.trajectory_to_proto(t.timestamps_us, t.T_object_world),
                object_size=common_pb2.AABB(size_x=float(t.dims[0]), size_y=float(t.dims[1]), size_z=float(t.dims[2])),
                asset_id=edits.asset_of(t.track_id) or "none",
            )
        return out

    @_rpc("render")
    def edit_assets(self, request, call):
        # Edit failures come back in-band (NRE's contract); an unknown scene is NOT_FOUND like everywhere.
        # Editing changes what every client of the scene sees, so it needs the server's editing flag.
        if not self.options.enable_editing_actors:
            raise errs.FailedPrecondition(
                "edit_assets: actor editing is disabled on this server; restart serve-grpc with --enable-editing-actors"
            )
        self._meta(request.scene_id)
        loaded = self.scene_cache.peek(request.scene_id)
        try:
            edits = self.editor.edit(request, loaded)
        except EditError as e:
            _LOGGER.info("edit_assets %s failed: %s", errs.quoted(request.scene_id), e)
            return sensorsim_pb2.EditAssetsResponse(success=False, message=f"Failed to edit assets: {e}")
        _LOGGER.info("edit_assets %s: %s", errs.quoted(request.scene_id), describe(edits))
        return sensorsim_pb2.EditAssetsResponse(success=True, message="Success")

    @_rpc("meta")
    def restore_model_parameters(self, request, call):
        self._meta(request.scene_id)
        self.editor.restore(request.scene_id)
        return common_pb2.Empty()
