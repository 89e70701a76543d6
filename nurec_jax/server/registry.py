"""Which scenes the server knows: artifacts found by `--artifact-glob` plus scenes registered at
request time through the `x-nre-scene-url` / `x-nre-scene-id` metadata (protocol.md section 1).

Only metadata is read here (ids, cameras, trajectory, tracks), never Gaussians, so every metadata
RPC is answered from the file without touching the device.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import threading

from nurec_jax.metadata import SceneMetadata
from nurec_jax.scene import LoadOptions, read_scene_metadata
from nurec_jax.server.downloads import SCENE_ID_RE, DownloadCache, DownloadError, parse_scene_url
from nurec_jax.server.errors import InvalidArgument, NotFound

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SceneEntry:
    """A known scene: its id on the wire, its file and where it came from (artifact, local, download)."""

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
    return found, broken


class SceneRegistry:
    """Thread-safe map scene id -> file, with a metadata cache."""

    def __init__(self, artifacts: dict[str, str], downloads: DownloadCache | None = None,
                 options: LoadOptions = LoadOptions(), broken: dict[str, str] | None = None):
        self._options = options
        self._downloads = downloads
        self._lock = threading.Lock()
        self._entries = {sid: SceneEntry(sid, path, "artifact") for sid, path in artifacts.items()}
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
            raise NotFound(f"scene_id: unknown scene {scene_id!r} (available: {', '.join(self.ids()) or 'none'})")
        if e.origin == "download" and self._downloads is not None:
            self._downloads.touch(scene_id)
        return e

    def metadata(self, scene_id: str) -> SceneMetadata:
        """The scene's metadata (read once per file version), with `scene_id` set to the wire id."""
        e = self.entry(scene_id)
        try:
            stat = os.stat(e.path)
        except OSError as err:
            raise NotFound(f"scene_id: the file of scene {scene_id!r} is gone ({err})") from None
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

    def register(self, scene_id: str, url: str) -> SceneEntry:
        """Registers a scene from request metadata (NRE's SceneDownloadInterceptor semantics)."""
        if not SCENE_ID_RE.match(scene_id or ""):
            raise InvalidArgument(f"x-nre-scene-id: Invalid scene ID: {scene_id!r} (allowed: letters, digits, . _ -)")
        try:
            kind, where = parse_scene_url(url)
        except DownloadError as e:
            raise InvalidArgument(f"x-nre-scene-url: {e}") from None
        with self._lock:
            existing = self._entries.get(scene_id)
        if kind == "local":
            path = os.path.realpath(where)
            if existing is not None:
                if os.path.realpath(existing.path) == path:
                    return existing
                raise InvalidArgument(f"x-nre-scene-id: scene {scene_id!r} is already registered for "
                                      f"{existing.path}, not {path}")
            if not os.path.isfile(path):
                raise InvalidArgument(f"x-nre-scene-url: Failed to register local scene from {url}: no such file")
            try:
                read_scene_metadata(path, self._options)
            except Exception as e:  # noqa: BLE001
                raise InvalidArgument(f"x-nre-scene-url: Failed to register local scene from {url}: {e}") from None
            entry = SceneEntry(scene_id, path, "local", url)
        else:
            if existing is not None:
                return existing
            if self._downloads is None:
                raise InvalidArgument("x-nre-scene-url: scene downloads are disabled on this server")
            try:
                path, evicted = self._downloads.fetch(scene_id, url)
                read_scene_metadata(path, self._options)
            except DownloadError as e:
                raise InvalidArgument(f"x-nre-scene-url: Failed to download scene from {url}: {e}") from None
            except Exception as e:  # noqa: BLE001 - the file arrived but is no scene
                raise InvalidArgument(f"x-nre-scene-url: Failed to download scene from {url}: {e}") from None
            for old in evicted:
                self._unregister(old)
            entry = SceneEntry(scene_id, path, "download", url)
        with self._lock:
            self._entries[scene_id] = entry
        _LOGGER.info("registered scene %r from %s", scene_id, url)
        return entry

    def _unregister(self, scene_id: str) -> None:
        with self._lock:
            self._entries.pop(scene_id, None)
            self._meta.pop(scene_id, None)
        if self.on_unregister is not None:
            self.on_unregister(scene_id)
