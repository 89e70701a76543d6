"""The server: `create_server(address, options) -> (Server, port)`.

`Server` runs a grpc.aio server on its own event-loop thread, so the CLI, tests and benchmarks can
drive it from ordinary synchronous code. It registers SensorsimService under NRE's name
(`nre.grpc.protos.sensorsim.SensorsimService`) and NuRec 26.x's (`nurec.grpc.protos.sensorsim...`), the
standard health service (for "" and both service names) and server reflection (listing both). Health is NOT_SERVING until the
start-up warm-up (`--test-scenes-are-valid`) is done, and flips back to NOT_SERVING on shutdown,
before in-flight calls are allowed to finish.

Who may call (`auth.py`): the port speaks TLS with `--tls-cert-file/--tls-key-file` (and demands client
certificates signed by `--tls-client-ca-file`); with `--auth-token-file` an interceptor refuses every call
but health that lacks the bearer token (reflection included). The extra `--health-port` stays plaintext
and open: it serves only health, for probes that speak neither TLS nor tokens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading

import grpc
import jax
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nurec_jax.render import RenderOptions
from nurec_jax.renderer import LidarCaster, Renderer
from nurec_jax.scene import LoadOptions, Scene, load_scene
from nurec_jax.server import auth, downloads, metrics, postprocess, warmup
from nurec_jax.server.download_cache import DownloadCache
from nurec_jax.server.ego_masks import EgoMasks
from nurec_jax.server.options import ServerOptions
from nurec_jax.server.profiler import Profiler
from nurec_jax.server.registry import SceneRegistry, discover_artifacts
from nurec_jax.server.scene_cache import SceneCache, load_on_device, resolve_devices
from nurec_jax.server.servicer import SERVICE_NAMES, SensorsimServicer, add_to_server
from nurec_jax.server.timing_log import TimingLog

_LOGGER = logging.getLogger(__name__)

SERVICE_NAME = SERVICE_NAMES[0]  # NRE's
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def enable_compilation_cache(directory: str, min_compile_time_s: float = 1.0) -> str:
    """Turns on JAX's persistent compilation cache (process-wide), so a restarted server reuses the
    render functions an earlier process compiled instead of compiling them again."""
    path = os.path.expanduser(directory)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    _LOGGER.info("persistent compilation cache: %s", path)
    return path


class Server:
    """A running (or about to run) nurec-jax gRPC server."""

    def __init__(
        self,
        options: ServerOptions,
        address: str | None = None,
        loader=None,
        load_options: LoadOptions = LoadOptions(),
        renderer: Renderer | None = None,
        lidar_caster: LidarCaster | None = None,
    ):
        options.validate()
        self.options = options
        # Several accelerators (nurec-jax): the local devices --devices names (a bad id stops the server here,
        # naming the flag); None without it: JAX's default device, one lock, as with one accelerator.
        self.devices = resolve_devices(options.devices)
        if options.compilation_cache_dir:
            enable_compilation_cache(options.compilation_cache_dir)
        self.address = address or f"{options.host}:{options.port}"
        # Read once at start so a bad file stops the server here, naming its flag.
        self._credentials = (
            None
            if options.tls_cert_file is None
            else auth.server_credentials(options.tls_cert_file, options.tls_key_file, options.tls_client_ca_file)
        )
        self._token = None if options.auth_token_file is None else auth.read_token(options.auth_token_file)
        artifacts, broken = (
            ({}, {}) if options.artifact_glob is None else discover_artifacts(options.artifact_glob, load_options)
        )
        if options.test_scenes_are_valid and broken:
            raise ValueError("unreadable scene artifacts: " + "; ".join(f"{p}: {e}" for p, e in broken.items()))
        download_cache = DownloadCache.from_options(options)
        self.registry = SceneRegistry(artifacts, download_cache, load_options, broken)

        def default_loader(scene_id: str) -> Scene:
            return load_scene(self.registry.entry(scene_id).path, load_options)

        load = loader or default_loader
        # --cache-size and --max-workers count per device; a scene's instances live on one device each.
        self.scene_cache = SceneCache(
            load if self.devices is None else functools.partial(load_on_device, load),
            options.cache_size,
            devices=self.devices,
            max_instances=options.max_backends_per_scene or 1,
        )
        if self.devices is not None:
            _LOGGER.info(
                "devices: %s (--cache-size %d scenes each)", ", ".join(map(str, self.devices)), options.cache_size
            )
        self.renderer = renderer or Renderer(
            RenderOptions(pair_capacity=options.initial_pair_capacity), max_pair_capacity=options.max_pair_capacity
        )
        self.lidar_caster = lidar_caster or LidarCaster(max_pair_capacity=options.max_pair_capacity)
        # Bounded work (nurec-jax): the compiled-variant LRU is process-wide (shared by every Renderer and
        # LidarCaster of the process); the output-size limit travels with each request's validation.
        self.renderer.compiled_cache.resize(options.max_compiled_variants)
        # Operations: timing log / metrics.yaml, profiler, post-processing model. Each raises ValueError naming
        # its flag (a missing nvtx package, Tracy, an unusable path, no post-processing model), so a
        # misconfigured server refuses to start instead of failing requests.
        self.timing_log = TimingLog(
            options.timing_verbosity if options.enable_timing else "NONE",
            options.timing_logfile if options.enable_timing else None,
            options.metrics_output_dir,
        )
        self.profiler = Profiler(options.profiling_backend, os.path.expanduser(options.profiling_trace_dir))
        postprocessor = None
        if options.enable_difix:
            postprocessor = postprocess.load_postprocessor(
                options.difix_cache,
                options.difix_model_filename,
                options.difix_url,
                options.difix_resolution,
                downloads.policy_from_options(options),
                downloads.Limits.from_options(options),
            )
            _LOGGER.info("post-processing (--enable-difix): %s", postprocessor.describe())
        self.servicer = SensorsimServicer(
            options,
            self.registry,
            self.scene_cache,
            self.renderer,
            EgoMasks(options.egocar_hood_dir),
            self.lidar_caster,
            timing_log=self.timing_log,
            profiler=self.profiler,
            postprocessor=postprocessor,
        )
        self.metrics_server = (
            None
            if options.metrics_port is None
            else metrics.MetricsServer(options.host, options.metrics_port, self.servicer.snapshot)
        )
        self.metrics_port: int | None = None
        self.servicer.on_shut_down = lambda: self.request_shutdown(delay_s=0.1)
        self.scene_cache.on_drop = self.servicer.editor.forget_view

        def unregistered(scene_id: str) -> None:
            self.scene_cache.drop(scene_id)
            self.servicer.editor.restore(scene_id)

        self.registry.on_unregister = unregistered
        self.port: int | None = None
        self.health_port: int | None = None
        self.warmup_error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._started = False
        self._warm_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._terminated = threading.Event()
        self.serving = threading.Event()

    # ----------------------------------------------------------------------------------------

    async def _set_health(self, status) -> None:
        """The health status of the server ("") and of SensorsimService under both of its names."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> int:
        msg = [
            ("grpc.max_send_message_length", self.options.max_message_bytes),
            ("grpc.max_receive_message_length", self.options.max_message_bytes),
        ]
        interceptors = [auth.BearerTokenInterceptor(self._token)] if self._token is not None else None
        self._server = grpc.aio.server(options=msg, interceptors=interceptors)
        add_to_server(self.servicer, self._server)  # undecodable requests answer INVALID_ARGUMENT
        self.health = health.aio.HealthServicer()
        await self._set_health(NOT_SERVING)  # "" and both service names (NRE's and NuRec 26.x's)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        try:
            port = (
                self._server.add_insecure_port(self.address)
                if self._credentials is None
                else self._server.add_secure_port(self.address, self._credentials)
            )
        except RuntimeError as e:  # grpc.aio raises instead of returning 0 on some failures
            raise OSError(f"could not bind {self.address}: {e}") from None
        if port == 0:
            raise OSError(f"could not bind {self.address}")
        self._health_server = None
        hp = self.options.health_port
        if hp is not None and (hp != self.options.port or hp == 0):  # 0 and 0: two ephemeral ports
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            host = self.address.rsplit(":", 1)[0]
            self.health_port = self._health_server.add_insecure_port(f"{host}:{self.options.health_port}")
            await self._health_server.start()
        await self._server.start()
        return port

    def start(self) -> int:
        """Binds and starts serving; returns the bound port. Warm-up runs in the background."""
        if self._started:
            return self.port
        self._started = True
        self._thread.start()
        try:
            self.port = self._call(self._start(), timeout=60)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self.profiler.start()
        if self.metrics_server is not None:
            self.metrics_port = self.metrics_server.start()
            _LOGGER.info("metrics: http://%s:%d/metrics", self.options.host, self.metrics_port)
        self._warm_thread = threading.Thread(target=self._warm_up, name="warm-up", daemon=True)
        self._warm_thread.start()
        _LOGGER.info(
            "serving SensorsimService on %s (port %d, %s%s), %d scene(s)",
            self.address,
            self.port,
            "plaintext" if self._credentials is None else ("mTLS" if self.options.tls_client_ca_file else "TLS"),
            ", bearer token" if self._token is not None else "",
            len(self.registry.ids()),
        )
        warning = auth.exposure_warning(
            self.address,
            self._credentials is not None,
            self._token is not None,
            self.options.tls_client_ca_file is not None,
        )
        if warning is not None:
            _LOGGER.warning(warning)
        return self.port

    def _warm_up(self) -> None:
        try:
            if self.options.test_scenes_are_valid:
                for sid in self.registry.ids():
                    if self._stopping.is_set():
                        return
                    _LOGGER.info("warm-up: loading scene %r", sid)
                    with self.scene_cache.use(sid):
                        pass
        except BaseException as e:  # noqa: BLE001 - reported; the server stops
            self.warmup_error = e
            _LOGGER.error("warm-up failed, shutting down: %s", e)
            self.request_shutdown()
            return
        if not self._stopping.is_set():
            # A stop may end the event loop before it runs this: wait for either, never for a dead loop.
            done = asyncio.run_coroutine_threadsafe(self._set_health(SERVING), self._loop)
            while not done.done():
                if self._terminated.wait(0.05):
                    done.cancel()
                    return
            done.result()
            self.serving.set()
            _LOGGER.info("health: SERVING")
            if self.options.test_scenes_are_valid and self.options.warmup_compiles:
                warmup.warm_up(
                    self.registry.ids(),
                    self.registry,
                    self.scene_cache,
                    self.renderer,
                    self.servicer.device_locks,
                    self._stopping,
                    self.servicer.warmup,
                    self.options.warmup_height,
                )

    # ----------------------------------------------------------------------------------------

    async def _stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        self.servicer.shutting_down = True
        await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(None)

    def request_shutdown(self, grace: float | None = None, delay_s: float = 0.0) -> None:
        """Starts a graceful shutdown from any thread (signal handlers, the shut_down RPC)."""
        if self._stopping.is_set() or not self._started:
            return
        self._stopping.set()
        grace = self.options.shutdown_grace_s if grace is None else grace

        def run():
            async def go():
                if delay_s:
                    await asyncio.sleep(delay_s)
                try:
                    await self._stop(grace)
                finally:
                    self.servicer.close()
                    self._close_operations()
                    self._terminated.set()
                    self._loop.call_soon(self._loop.stop)

            asyncio.ensure_future(go())

        self._loop.call_soon_threadsafe(run)

    def _close_operations(self) -> None:
        for close in (
            self.timing_log.close,
            self.profiler.stop,
            self.metrics_server.stop if self.metrics_server is not None else None,
        ):
            if close is None:
                continue
            try:
                close()
            except Exception as e:  # noqa: BLE001 - shutdown goes on
                _LOGGER.error("shutdown: %s failed: %s", close, e)

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop; returns when the server has terminated."""
        self.request_shutdown(grace)
        self.wait_for_termination()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        if not self._started:
            return True
        done = self._terminated.wait(timeout)
        if done:
            self._thread.join(timeout=5)
            if self._warm_thread is not None:  # it stops between renders; let a render in progress end
                self._warm_thread.join(timeout=60)
        return done


def create_server(address: str, options: ServerOptions = ServerOptions(), **kwargs) -> tuple[Server, int]:
    """Builds, binds and starts a server; returns it and the port it bound (use port 0 in tests)."""
    server = Server(options, address, **kwargs)
    return server, server.start()
