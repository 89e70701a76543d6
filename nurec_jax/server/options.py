"""`ServerOptions`: every serve-grpc setting, with NuRec's names and defaults (docs/wire.md#server-flags)."""

from __future__ import annotations

import dataclasses
import os

from nurec_jax.server.profiler import PROFILING_BACKENDS
from nurec_jax.server.timing_log import TIMING_VERBOSITIES

RENDERERS = ("default", "gsplat", "nrend")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """serve-grpc settings. The first block mirrors NRE's GrpcServerConfig (same keys in
    get_server_config); the last block is nurec-jax's own."""

    artifact_glob: str | None = None
    host: str = "localhost"
    port: int = 8080
    health_port: int | None = None
    test_scenes_are_valid: bool = False
    renderer: str = "default"
    enable_difix: bool = False
    difix_url: str | None = None
    difix_cache: str = "~/.cache/nre/difix"
    difix_model_filename: str = "cosmos_3dgut.pt"
    difix_resolution: tuple[int, int] = (576, 1024)
    ray_chunk_size: int = 2**62
    egocar_hood_dir: str | None = None
    download_cache_dir: str = "~/.cache/nre/downloaded_scenes"
    download_cache_size: int = 5
    max_workers: int = 1
    enable_editing_actors: bool = False
    cache_size: int = 10
    metrics_output_dir: str | None = None
    # Seed / later-NRE flags.
    enable_nrend: bool = True
    enable_timing: bool = False
    timing_verbosity: str = "BASIC"
    timing_logfile: str | None = None
    timing_synchronize: bool = False
    profiling_backend: str = "NONE"
    max_backends_per_scene: int | None = None
    enable_harmonizer: bool = False
    # nurec-jax.
    lidar_repeated_fields: bool = True
    compilation_cache_dir: str | None = None  # JAX's persistent compilation cache (None: off)
    warmup_compiles: bool = True  # with test_scenes_are_valid: render every camera once after SERVING
    warmup_height: int = 0  # output height of warm-up renders (width keeps the aspect); 0: native
    profiling_trace_dir: str = "~/.cache/nurec-jax/profiles"  # where --profiling-backend JAX writes its trace
    metrics_port: int | None = None  # serve GET /metrics (Prometheus text) on this HTTP port
    max_message_bytes: int = 64 << 20
    download_max_bytes: int = 8 << 30  # largest scene download (Content-Length and streamed bytes)
    initial_pair_capacity: int = 1 << 16
    max_pair_capacity: int = 1 << 26
    shutdown_grace_s: float = 30.0
    metadata_threads: int = 4
    # Security (nurec-jax)
    tls_cert_file: str | None = None  # PEM certificate chain: serve TLS instead of plaintext
    tls_key_file: str | None = None  # PEM private key of tls_cert_file
    tls_client_ca_file: str | None = None  # mTLS: clients must present a certificate signed by this CA
    auth_token_file: str | None = None  # a file holding the token clients send as "authorization: Bearer <t>"
    allow_remote_shutdown: bool = False  # accept shut_down from non-loopback peers
    # Hardening (nurec-jax)
    asset_dir: str | None = None  # edit_assets may read .ply files only below this directory (None: none)
    # Downloads (nurec-jax)
    download_timeout_s: float = 1800.0  # a whole x-nre-scene-url download, connect to last byte
    download_stall_timeout_s: float = 60.0  # a download receiving no byte this long fails
    download_workers: int = 2  # download threads (never the metadata or render workers)
    download_allow_private: bool = False  # allow loopback / private / link-local / ... destinations
    download_allow_hosts: tuple[str, ...] = ()  # host names (".suffix" for a domain) or IPs/CIDRs always allowed
    # Bounded work (nurec-jax)
    max_output_pixels: int = 12 << 20  # largest output width x height (NuRec's rule applied) a request may ask
    max_compiled_variants: int = 16  # compiled render / lidar functions kept (process-wide LRU; evicted: freed)
    # Several accelerators (nurec-jax)
    devices: str | None = None  # --devices: "all" or ids "0,2"; None: JAX's default device only (one lock)

    def validate(self) -> None:
        """Raises ValueError naming the flag for values out of range or features not built yet."""
        if self.artifact_glob is not None and not self.artifact_glob.lower().endswith(".usdz"):
            raise ValueError(f"--artifact-glob must end in .usdz, got {self.artifact_glob!r}")
        for name in ("max_workers", "cache_size", "download_cache_size", "metadata_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"--health-port must be in 0..65535, got {self.health_port}")
        for name in ("initial_pair_capacity", "max_pair_capacity"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a power of two, got {v}")
        if self.initial_pair_capacity > self.max_pair_capacity:
            raise ValueError("--initial-pair-capacity must not exceed --max-pair-capacity")
        if self.warmup_height < 0:
            raise ValueError(f"--warmup-height must be >= 0, got {self.warmup_height}")
        if self.ray_chunk_size < 1:
            raise ValueError(f"--ray-chunk-size must be >= 1, got {self.ray_chunk_size}")
        if self.renderer not in RENDERERS:
            raise ValueError(f"--renderer must be one of {RENDERERS}, got {self.renderer!r}")
        if self.timing_verbosity not in TIMING_VERBOSITIES:
            raise ValueError(f"--timing-verbosity must be one of {TIMING_VERBOSITIES}, got {self.timing_verbosity!r}")
        if self.profiling_backend not in PROFILING_BACKENDS:
            raise ValueError(f"--profiling-backend must be one of {PROFILING_BACKENDS}, got {self.profiling_backend!r}")
        if self.egocar_hood_dir is not None and not os.path.isdir(os.path.expanduser(self.egocar_hood_dir)):
            raise ValueError(f"--egocar-hood-dir {self.egocar_hood_dir!r} is not a directory")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        # Security (nurec-jax): refuse half-configured TLS and unreadable files at start.
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-key-file needs --tls-cert-file (the certificate the key belongs to)")
        if self.tls_cert_file is not None and self.tls_key_file is None:
            raise ValueError("--tls-cert-file needs --tls-key-file (the certificate's private key)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "--tls-client-ca-file needs --tls-cert-file and --tls-key-file (client certificates "
                "are checked in the TLS handshake)"
            )
        from nurec_jax.server import auth

        if self.tls_cert_file is not None:
            auth.check_key_pair(self.tls_cert_file, self.tls_key_file)
        if self.tls_client_ca_file is not None:
            auth.check_ca(self.tls_client_ca_file, "--tls-client-ca-file")
        if self.auth_token_file is not None:
            auth.read_token(self.auth_token_file)
        # Hardening (nurec-jax)
        if self.asset_dir is not None and not os.path.isdir(os.path.expanduser(self.asset_dir)):
            raise ValueError(f"--asset-dir {self.asset_dir!r} is not a directory")
        # Downloads (nurec-jax)
        if self.download_max_bytes < 1:
            raise ValueError(f"--download-max-bytes must be >= 1, got {self.download_max_bytes}")
        for name in ("download_timeout_s", "download_stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.download_workers < 1:
            raise ValueError(f"--download-workers must be >= 1, got {self.download_workers}")
        from nurec_jax.server.downloads import parse_allow_entry

        for entry in self.download_allow_hosts:
            try:
                parse_allow_entry(entry)
            except ValueError as e:
                raise ValueError(f"--download-allow-hosts: {e}") from None
        # Bounded work (nurec-jax)
        for name in ("max_output_pixels", "max_compiled_variants"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # Several accelerators (nurec-jax): the syntax here; the ids are checked against the local devices when
        # the server starts (scene_cache.resolve_devices).
        if self.devices is not None:
            parse_devices(self.devices)
        if self.max_backends_per_scene is not None and self.max_backends_per_scene < 1:
            raise ValueError(f"--max-backends-per-scene must be >= 1, got {self.max_backends_per_scene}")
        if self.enable_harmonizer:
            raise ValueError(
                "--enable-harmonizer: NRE's harmonizer network is not available in nurec-jax; use "
                "--enable-difix with a nurec-jax post-processing model instead (BUILD_NOTES.md)"
            )

    def as_strings(self) -> dict[str, str]:
        """Every setting as NRE's get_server_config reports it: str(), None -> "null"."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = "null" if v is None else str(v)
        return out


def parse_devices(spec: str) -> tuple[int, ...] | None:
    """`--devices` syntax: "all" (returns None) or comma-separated local device ids such as "0,2" (returns
    them in order). Raises ValueError naming the flag for anything else, an empty list or a repeated id."""
    text = spec.strip()
    if text.lower() == "all":
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--devices must be 'all' or comma-separated local device ids such as 0,1; got {spec!r}")
    ids = tuple(int(p) for p in parts)
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"--devices names device {repeated[0]} more than once: {spec!r}")
    return ids
