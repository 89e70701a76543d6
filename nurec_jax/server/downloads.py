"""The download cache behind the `x-nre-scene-url` / `x-nre-scene-id` request metadata.

http(s) scenes are fetched into `--download-cache-dir` (an LRU of `--download-cache-size` files):
streamed into a hidden temporary file in the same directory, size-limited, checked to be a zip
archive, then renamed into place, so a failed or interrupted download never leaves a file that
looks complete. Local URLs (`file://` or a bare absolute path) are not copied.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import urllib.parse
import urllib.request
import zipfile

from nurec_jax.fileio import atomic_file

_LOGGER = logging.getLogger(__name__)

SCENE_ID_RE = re.compile(r"^[.a-zA-Z0-9_-]+$")
REMOTE_SCHEMES = ("http", "https")
_CHUNK = 1 << 20


class DownloadError(Exception):
    """A scene could not be fetched; the message says why."""


def parse_scene_url(url: str) -> tuple[str, str]:
    """('local', absolute path) or ('remote', url). Raises DownloadError for other schemes."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "" and os.path.isabs(url):
        return "local", url
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DownloadError(f"file URL with a host ({parsed.netloc!r}) is not supported")
        return "local", urllib.parse.unquote(parsed.path)
    if parsed.scheme in REMOTE_SCHEMES:
        if not parsed.netloc:
            raise DownloadError(f"URL {url!r} has no host")
        return "remote", url
    raise DownloadError(f"unsupported URL scheme {parsed.scheme!r} (allowed: file, http, https, or an absolute path)")


class DownloadCache:
    """An LRU of downloaded scene files, keyed by scene id.

    `fetch(scene_id, url)` returns the local path and the ids evicted to make room (their files are
    gone; the caller unregisters them).
    """

    def __init__(self, directory: str, max_files: int = 5, max_bytes: int = 32 << 30, timeout_s: float = 600.0):
        if max_files < 1:
            raise ValueError(f"download cache size must be >= 1, got {max_files}")
        self.directory = os.path.expanduser(directory)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()  # id -> (url, path)
        self._busy: dict[str, threading.Lock] = {}

    def path_for(self, scene_id: str) -> str:
        return os.path.join(self.directory, f"{scene_id}.usdz")

    def __contains__(self, scene_id: str) -> bool:
        with self._lock:
            return scene_id in self._entries

    def touch(self, scene_id: str) -> None:
        with self._lock:
            if scene_id in self._entries:
                self._entries.move_to_end(scene_id)

    def fetch(self, scene_id: str, url: str) -> tuple[str, list[str]]:
        with self._lock:
            if scene_id in self._entries and self._entries[scene_id][0] == url:
                self._entries.move_to_end(scene_id)
                return self._entries[scene_id][1], []
            busy = self._busy.setdefault(scene_id, threading.Lock())
        with busy:  # one download per id at a time; a second caller waits and reuses it
            with self._lock:
                if scene_id in self._entries and self._entries[scene_id][0] == url:
                    return self._entries[scene_id][1], []
            path = self.path_for(scene_id)
            self._download(url, path)
            with self._lock:
                self._entries[scene_id] = (url, path)
                self._entries.move_to_end(scene_id)
                evicted = []
                while len(self._entries) > self.max_files:
                    old_id, (_, old_path) = self._entries.popitem(last=False)
                    evicted.append(old_id)
                    try:
                        os.remove(old_path)
                    except OSError:
                        pass
            if evicted:
                _LOGGER.info("download cache full: evicted %s", evicted)
            return path, evicted

    def _download(self, url: str, path: str) -> None:
        with atomic_file(path, "w+b") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "nurec-jax"})
            try:
                resp = urllib.request.urlopen(req, timeout=self.timeout_s)  # noqa: S310 (scheme checked)
            except Exception as e:  # HTTPError, URLError, timeouts
                raise DownloadError(f"request failed: {e}") from None
            with resp:
                length = resp.headers.get("Content-Length")
                if length is not None and int(length) > self.max_bytes:
                    raise DownloadError(f"scene is {int(length)} bytes, above the limit of {self.max_bytes}")
                total = 0
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise DownloadError(f"scene exceeds the download limit of {self.max_bytes} bytes")
                    out.write(chunk)
                if length is not None and total != int(length):
                    raise DownloadError(f"connection closed after {total} of {length} bytes")
            out.flush()
            if not zipfile.is_zipfile(out):
                raise DownloadError("downloaded file is not a .usdz (zip) archive")
