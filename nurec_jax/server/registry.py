"""Which scenes the server knows: artifacts found by `--artifact-glob` plus scenes registered at
request time through the `x-nre-scene-url` / `x-nre-scene-id` metadata (docs/wire.md#scene-download-headers).

Only metadata is read here (ids, cameras, trajectory, tracks), never Gaussians, so every metadata
RPC is answered from the file without touching the device. Request-time scenes are http(s) downloads
only (download_cache.py); a path on the server's disk is never taken from a request.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import threading

from nurec_jax.archive import USD_SUFFIXES
from nurec_jax.checkpoint import CHECKPOINT_MEMBER
from nurec_jax.errors import SceneFormatError
from nurec_jax.metadata import SceneMetadata
from nurec_jax.scene import LoadOptions, read_scene_metadata
from nurec_jax.server.download_cache import (
    MAX_SCENE_ID_CHARS,
    SCENE_ID_RE,
    DownloadCache,
    DownloadError,
    Pending,
    parse_scene_url,
)
from nurec_jax.server.request_errors import AlreadyExists, InvalidArgument, NotFound, check_id, quoted

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SceneEntry:
    """A known scene: its id on the wire, its file and where it came from (artifact or download)."""

    scene_id: str
    path: str
    origin: str
    url: str = ""


def discover_artifacts(pattern: str, options: LoadOptions = LoadOptions()) -> tuple[dict[str, str], dict[str, str]]:
    """Recursive glob of `.usdz` artifacts -> ({scene_id: path}, {path: error} for unreadable files).

    Raises ValueError when the pattern does not end in `.usdz` or two files share a scene id."""
    if not pattern.lower().endswith(".usdz"):
        raise ValueError(f"--artifact-glob must end in .usdz, got {pattern!r}")
    found: dict[str, str] = {}
    broken: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
        path = os.path.abspath(path)
        try:
            sid = read_scene_metadata(path, options).scene_id
        except Exception as e:  # noqa: BLE001 - reported, the server keeps the other scenes
            broken[path] = f"{type(e).__name__}: {e}"
            _LOGGER.error("skipping unreadable artifact %s: %s", path, e)
            continue
        if sid in found:
            raise ValueError(f"scene id {sid!r} is used by two artifacts: {found[sid]} and {path}")
        found[sid] = path
    if not found:  # allowed: scenes may still arrive through x-nre-scene-url
        _LOGGER.warning(
            "--artifact-glob %r matched no readable scene (%d unreadable); the server starts with "
            "no --artifact-glob scene",
            pattern,
            len(broken),
        )
    return found, broken


class SceneRegistry:
    """Thread-safe map scene id -> file, with a metadata cache."""

    def __init__(
        self,
        artifacts: dict[str, str],
        downloads: DownloadCache | None = None,
        options: LoadOptions = LoadOptions(),
        broken: dict[str, str] | None = None,
    ):
        self._options = options
        self._downloads = downloads
        self._lock = threading.Lock()
        self._entries = {sid: SceneEntry(sid, path, "artifact") for sid, path in artifacts.items()}
        # Downloads an earlier run left in the cache (re-indexed by DownloadCache) are known again.
        for sid, url, path in downloads.entries() if downloads is not None else ():
            if url is None:
                continue
            if sid in self._entries:
                _LOGGER.warning(
                    "downloaded scene %s is shadowed by the --artifact-glob scene with the same id", quoted(sid)
                )
                continue
            self._entries[sid] = SceneEntry(sid, path, "download", url)
        self._meta: dict[str, tuple[tuple, SceneMetadata]] = {}
        self.broken = dict(broken or {})
        self.on_unregister = None  # callback(scene_id) when a downloaded scene is evicted

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entry(self, scene_id: str) -> SceneEntry:
        with self._lock:
            e = self._entries.get(scene_id)
        if e is None:
            raise NotFound(f"scene_id: unknown scene {quoted(scene_id)} (available: {', '.join(self.ids()) or 'none'})")
        if e.origin == "download" and self._downloads is not None:
            self._downloads.touch(scene_id)
        return e

    def metadata(self, scene_id: str) -> SceneMetadata:
        """The scene's metadata (read once per file version), with `scene_id` set to the wire id."""
        e = self.entry(scene_id)
        try:
            stat = os.stat(e.path)
        except OSError as err:
            raise NotFound(f"scene_id: the file of scene {quoted(scene_id)} is gone ({err})") from None
        key = (e.path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._meta.get(scene_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        meta = read_scene_metadata(e.path, self._options)
        if meta.scene_id != scene_id:
            meta = dataclasses.replace(meta, scene_id=scene_id)
        with self._lock:
            self._meta[scene_id] = (key, meta)
        return meta

    def request(self, scene_id: str, url: str) -> Pending | None:
        """Starts registering a scene from request metadata (NRE's SceneDownloadInterceptor semantics);
        never blocks on the network. None: nothing to wait for (already registered); otherwise a `Pending`
        whose future resolves once the scene is downloaded and registered (release it when the client
        stops waiting).

        Only http(s) URLs are accepted. An id that is an `--artifact-glob` scene ignores the URL; an id
        already downloaded (or downloading) from another URL is ALREADY_EXISTS naming both."""
        check_id(scene_id or "", "x-nre-scene-id", MAX_SCENE_ID_CHARS)
        check_id(url or "", "x-nre-scene-url", 4096)
        if not SCENE_ID_RE.match(scene_id or ""):
            raise InvalidArgument(
                f"x-nre-scene-id: Invalid scene ID: {quoted(scene_id)} (allowed: letters, digits, . _ -)"
            )
        try:
            parse_scene_url(url)
        except DownloadError as e:
            raise InvalidArgument(f"x-nre-scene-url: {e}") from None
        with self._lock:
            existing = self._entries.get(scene_id)
        if existing is not None:
            if existing.origin != "download":
                return None
            if existing.url == url:
                if self._downloads is not None:
                    self._downloads.touch(scene_id)
                return None
            raise AlreadyExists(
                f"x-nre-scene-id: scene {quoted(scene_id)} is already registered from "
                f"{quoted(existing.url, 256)}; refusing {quoted(url, 256)} (use another scene id "
                "for another URL)"
            )
        if self._downloads is None:
            raise InvalidArgument("x-nre-scene-url: scene downloads are disabled on this server")
        return self._downloads.request(scene_id, url, validate=self._validate_download, on_commit=self._downloaded)

    def register(self, scene_id: str, url: str, timeout: float | None = None) -> SceneEntry:
        """`request` and wait for it (no cancellation); returns the scene's entry."""
        pending = self.request(scene_id, url)
        if pending is not None:
            try:
                pending.wait(timeout)
            finally:
                pending.release()
        return self.entry(scene_id)

    def close(self) -> None:
        """Stops scene downloads in progress (server shutdown)."""
        if self._downloads is not None:
            self._downloads.close()

    def _validate_download(self, path: str) -> None:
        """A downloaded file must read as a scene and hold something `load_scene` can render from (a USD
        layer, a .nurec payload or a training checkpoint); Gaussians are not decoded here."""
        meta = read_scene_metadata(path, self._options)
        if not any(m.lower().endswith(USD_SUFFIXES + (".nurec",)) or m == CHECKPOINT_MEMBER for m in meta.members):
            raise SceneFormatError("no USD layer, .nurec payload or checkpoint in the archive")

    def _downloaded(self, scene_id: str, url: str, path: str, evicted: list[str]) -> None:
        """Called by the download cache once a file is in place (before any waiter is told)."""
        for old in evicted:
            self._unregister(old)
        with self._lock:
            if scene_id in self._entries and self._entries[scene_id].origin != "download":
                return  # an --artifact-glob scene keeps its id
            self._entries[scene_id] = SceneEntry(scene_id, path, "download", url)
            self._meta.pop(scene_id, None)
        _LOGGER.info("registered scene %s from %s", quoted(scene_id), quoted(url, 256))

    def _unregister(self, scene_id: str) -> None:
        """Forgets an evicted download (an --artifact-glob scene with the same id stays)."""
        with self._lock:
            e = self._entries.get(scene_id)
            if e is None or e.origin != "download":
                return
            del self._entries[scene_id]
            self._meta.pop(scene_id, None)
        if self.on_unregister is not None:
            self.on_unregister(scene_id)
