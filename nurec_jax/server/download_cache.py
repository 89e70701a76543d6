"""The cache of scenes downloaded for the `x-nre-scene-url` / `x-nre-scene-id` request metadata.

Fetching follows `downloads.py` (http/https only, checked destinations, size / time / stall bounds,
cancellation). This module adds what scenes need on top: downloads run on their own `--download-workers`
threads, and clients wait for them without holding a thread; clients asking for the same scene id share
one download, which stops when the last of them gives up; one id is bound to one URL (a second URL is
ALREADY_EXISTS naming both).

The cache directory holds `<scene_id>.usdz` files and `index.json` (scene id -> URL, in LRU order,
written atomically). A download is streamed into a hidden `.<id>.<random>.part.usdz` file, checked to be
a zip archive and a readable scene, and only then renamed into place; a file that fails never enters the
cache and evicts nothing. At start, partial files left by a crash are deleted and the directory is
indexed again, so a restarted server knows (and counts, and evicts) the files an earlier one fetched.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import ssl
import tempfile
import threading
import zipfile

import grpc

from nurec_jax.fileio import atomic_file
from nurec_jax.server.downloads import (
    PART_MARK,
    URL_CHARS,
    DestinationPolicy,
    DownloadError,
    DownloadUnavailable,
    Limits,
    Transfer,
    check_url,
    fetch,
    policy_from_options,
    time_bound,
)
from nurec_jax.server.request_errors import quoted

_LOGGER = logging.getLogger(__name__)

SCENE_ID_RE = re.compile(r"^[.a-zA-Z0-9_-]+$")
MAX_SCENE_ID_CHARS = 200  # a downloaded scene id names a file (<id>.usdz and its partial file)
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
_HEADER = "x-nre-scene-url"


class DownloadConflict(DownloadError):
    """The scene id is already bound to another URL (ALREADY_EXISTS)."""

    code = grpc.StatusCode.ALREADY_EXISTS


def parse_scene_url(url: str) -> str:
    """Returns `url` when it may name a scene download (`downloads.check_url`); DownloadError otherwise."""
    return check_url(url, "scenes on the server's disk are served through --artifact-glob")


# ------------------------------------------------------------------------------------------------
# Jobs and waiters


class Pending:
    """One client waiting for a scene: `future` resolves to the local path (or the download's error).

    `release()` says the client no longer waits (cancelled, deadline passed); when the last waiter of a
    download releases it, the download stops."""

    def __init__(self, cache: "DownloadCache | None", job: "_Job | None"):
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._cache = cache
        self._job = job

    def release(self) -> None:
        if self._cache is not None and self._job is not None:
            self._cache._release(self._job, self)

    def wait(self, timeout: float | None = None) -> str:
        return self.future.result(timeout)


class _Job(Transfer):
    """One scene download in progress: the transfer plus the clients waiting for it."""

    def __init__(self, scene_id: str, url: str, validate, on_commit):
        super().__init__(url)
        self.scene_id = scene_id
        self.validate, self.on_commit = validate, on_commit
        self.waiters: list[Pending] = []
        self.finished = False


@dataclasses.dataclass
class _Entry:
    url: str | None  # None: a file found at start without a recorded URL
    path: str
    size: int


class DownloadCache:
    """An LRU of downloaded scene files, keyed by scene id (module docstring).

    `request(scene_id, url)` returns a `Pending`; `entries()` lists what is cached with its URL."""

    def __init__(
        self,
        directory: str,
        max_files: int = 5,
        max_bytes: int = 8 << 30,
        timeout_s: float = 1800.0,
        stall_timeout_s: float = 60.0,
        workers: int = 2,
        policy: DestinationPolicy = DestinationPolicy(),
        ssl_context: ssl.SSLContext | None = None,
    ):
        if max_files < 1:
            raise ValueError(f"download cache size must be >= 1, got {max_files}")
        if workers < 1:
            raise ValueError(f"download workers must be >= 1, got {workers}")
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.max_files = max_files
        self.limits = Limits(max_bytes, timeout_s, stall_timeout_s)
        self.policy = policy
        self.ssl_context = ssl_context  # None: the system's trusted CAs (tests pass their own)
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # oldest first
        self._jobs: dict[str, _Job] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="download")
        os.makedirs(self.directory, exist_ok=True)
        self._clean_partials()
        self._reindex()

    @classmethod
    def from_options(cls, options) -> "DownloadCache":
        """The cache a server with these `ServerOptions` uses."""
        limits = Limits.from_options(options)
        return cls(
            options.download_cache_dir,
            options.download_cache_size,
            limits.max_bytes,
            limits.timeout_s,
            limits.stall_timeout_s,
            options.download_workers,
            policy_from_options(options),
        )

    # -- start-up ----------------------------------------------------------------------------

    def _take_directory(self) -> bool:
        """Locks the directory for this process (an flock on `.lock`, released when the process ends,
        crash included). False when another live server holds it: its partial files are in use."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, partial files are cleaned as if alone
            return True
        self._lock_file = open(os.path.join(self.directory, LOCK_NAME), "a+")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            _LOGGER.warning(
                "download cache %s is used by another server process; its partial files are left "
                "alone (give each server its own --download-cache-dir)",
                self.directory,
            )
            return False

    def _clean_partials(self) -> None:
        if not self._take_directory():
            return
        removed = 0
        for name in os.listdir(self.directory):
            if name.startswith(".") and PART_MARK in name:
                try:
                    os.remove(os.path.join(self.directory, name))
                    removed += 1
                except OSError as e:
                    _LOGGER.warning("download cache: cannot remove stale partial file %s: %s", name, e)
        if removed:
            _LOGGER.info("download cache: removed %d partial file(s) left by an earlier run", removed)

    def _reindex(self) -> None:
        recorded: list[dict] = []
        index = os.path.join(self.directory, INDEX_NAME)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    recorded = list(json.load(f)["entries"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                _LOGGER.warning("download cache: ignoring unreadable %s (%s)", index, e)
        for item in recorded:
            try:
                sid, url = str(item["scene_id"]), str(item["url"])
            except (KeyError, TypeError):
                continue
            path = self.path_for(sid) if SCENE_ID_RE.match(sid) else None
            if path and os.path.isfile(path) and sid not in self._entries:
                self._entries[sid] = _Entry(url, path, os.path.getsize(path))
        # Scene files without a recorded URL (an older server): counted, oldest first; a request for such
        # an id downloads it again.
        orphans = []
        for name in os.listdir(self.directory):
            sid, ext = os.path.splitext(name)
            if ext == ".usdz" and not name.startswith(".") and SCENE_ID_RE.match(sid) and sid not in self._entries:
                path = os.path.join(self.directory, name)
                if os.path.isfile(path):
                    orphans.append((os.path.getmtime(path), sid, path))
        for _mtime, sid, path in sorted(orphans, reverse=True):
            self._entries[sid] = _Entry(None, path, os.path.getsize(path))
            self._entries.move_to_end(sid, last=False)
        victims = []
        while len(self._entries) > self.max_files:
            victims.append(self._entries.popitem(last=False))
        for sid, entry in victims:
            _remove(entry.path)
        if self._entries or recorded:
            self._write_index()
        _LOGGER.info(
            "download cache %s: %d file(s) (%d without a recorded URL), %d evicted to fit %d",
            self.directory,
            len(self._entries),
            sum(e.url is None for e in self._entries.values()),
            len(victims),
            self.max_files,
        )

    def _write_index(self) -> None:
        with self._lock:
            items = [
                {"scene_id": sid, "url": e.url, "size": e.size} for sid, e in self._entries.items() if e.url is not None
            ]
        with self._index_lock:
            try:
                with atomic_file(os.path.join(self.directory, INDEX_NAME), "w", encoding="utf-8") as f:
                    json.dump({"version": 1, "entries": items}, f, indent=1)
            except OSError as e:
                _LOGGER.error("download cache: cannot write %s: %s", INDEX_NAME, e)

    # -- queries -----------------------------------------------------------------------------

    def path_for(self, scene_id: str) -> str:
        return os.path.join(self.directory, f"{scene_id}.usdz")

    def __contains__(self, scene_id: str) -> bool:
        with self._lock:
            return scene_id in self._entries

    def entries(self) -> list[tuple[str, str | None, str]]:
        """[(scene id, URL or None, path)], least recently used first."""
        with self._lock:
            return [(sid, e.url, e.path) for sid, e in self._entries.items()]

    def url_of(self, scene_id: str) -> str | None:
        with self._lock:
            e = self._entries.get(scene_id)
            return None if e is None else e.url

    def touch(self, scene_id: str) -> None:
        with self._lock:
            if scene_id in self._entries:
                self._entries.move_to_end(scene_id)

    # -- requests ----------------------------------------------------------------------------

    def request(self, scene_id: str, url: str, validate=None, on_commit=None) -> Pending:
        """Starts (or joins) the download of `url` as `scene_id`; never blocks on the network.

        `validate(path)` raises when the downloaded file is no usable scene; `on_commit(scene_id, url, path,
        evicted_ids)` runs once the file is in place, before any waiter is told. Raises DownloadConflict
        when the id is bound to another URL (cached or downloading)."""
        with self._lock:
            job = self._jobs.get(scene_id)
            if job is not None and not job.aborted:
                if job.url != url:
                    raise _conflict(scene_id, job.url, url, "being downloaded")
                pending = Pending(self, job)
                job.waiters.append(pending)
                return pending
            entry = self._entries.get(scene_id)
            if entry is not None and entry.url is not None:
                if entry.url != url:
                    raise _conflict(scene_id, entry.url, url, "already cached")
                self._entries.move_to_end(scene_id)
                pending = Pending(None, None)
                pending.future.set_result(entry.path)
                return pending
            job = _Job(scene_id, url, validate, on_commit)
            pending = Pending(self, job)
            job.waiters.append(pending)
            self._jobs[scene_id] = job
        try:
            self._pool.submit(self._run, job)
        except RuntimeError:  # the pool is shut down (server stopping)
            with self._lock:
                self._jobs.pop(scene_id, None)
            raise DownloadUnavailable("the server is shutting down") from None
        return pending

    def fetch(self, scene_id: str, url: str, validate=None, on_commit=None) -> str:
        """`request` and wait (no cancellation); returns the local path."""
        return self.request(scene_id, url, validate, on_commit).wait()

    def _release(self, job: _Job, pending: Pending) -> None:
        with self._lock:
            if pending in job.waiters:
                job.waiters.remove(pending)
            last = not job.waiters and not job.finished
            if last and self._jobs.get(job.scene_id) is job:
                del self._jobs[job.scene_id]
        pending.future.cancel()
        if last:
            _LOGGER.info("download of scene %s stopped: every client waiting for it gave up", quoted(job.scene_id))
            job.abort(DownloadUnavailable("every client waiting for the download gave up"))

    def close(self) -> None:
        """Stops every download (server shutdown)."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.abort(DownloadUnavailable("the server is shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)
        lock_file = getattr(self, "_lock_file", None)
        if lock_file is not None:
            lock_file.close()  # releases the directory lock
            self._lock_file = None

    # -- the download ------------------------------------------------------------------------

    def _run(self, job: _Job) -> None:
        prefix = f"{_HEADER}: Failed to download scene from {quoted(job.url, URL_CHARS)}"
        tmp = None
        error: BaseException | None = None
        path, evicted = None, []
        try:
            job.check()
            fd, tmp = tempfile.mkstemp(prefix=f".{job.scene_id}.", suffix=f"{PART_MARK}.usdz", dir=self.directory)
            with time_bound(job, self.limits), os.fdopen(fd, "wb") as out:
                size = fetch(job, out, self.policy, self.limits, self.ssl_context)
            job.check()
            if not zipfile.is_zipfile(tmp):
                raise DownloadError("the file is not a .usdz (zip) archive")
            if job.validate is not None:
                try:
                    job.validate(tmp)
                except Exception as e:  # noqa: BLE001 - the file arrived but is no scene
                    # The client hears about its file, not about the server's directories.
                    text = (
                        str(e)
                        .replace(tmp, f"{job.scene_id}.usdz")
                        .replace(os.path.basename(tmp), f"{job.scene_id}.usdz")
                    )
                    raise DownloadError(f"the file is not a readable scene: {text}") from None
            job.check()
            path, evicted = self._commit(job, tmp, size)
            tmp = None
            if job.on_commit is not None:
                job.on_commit(job.scene_id, job.url, path, evicted)
        except DownloadError as e:
            if job.aborted and e is not job.error:
                e = job.error
            error = e if str(e).startswith(_HEADER) else type(e)(f"{prefix}: {e}")
        except Exception as e:  # noqa: BLE001 - reported to the waiters
            _LOGGER.error("download of %s failed", quoted(job.url, URL_CHARS), exc_info=e)
            error = DownloadUnavailable(f"{prefix}: {type(e).__name__}: {e}")
        finally:
            if tmp is not None:
                _remove(tmp)
        with self._lock:
            job.finished = True
            if self._jobs.get(job.scene_id) is job:
                del self._jobs[job.scene_id]
            waiters = list(job.waiters)
        if error is None:
            _LOGGER.info(
                "downloaded scene %s from %s (%d bytes)",
                quoted(job.scene_id),
                quoted(job.url, URL_CHARS),
                job.bytes_read,
            )
        else:
            _LOGGER.info("download of scene %s: %s", quoted(job.scene_id), error)
        for w in waiters:
            if w.future.done():
                continue
            try:
                if error is not None:
                    w.future.set_exception(error)
                else:
                    w.future.set_result(path)
            except concurrent.futures.InvalidStateError:  # released meanwhile
                pass

    def _commit(self, job: _Job, tmp: str, size: int) -> tuple[str, list[str]]:
        path = self.path_for(job.scene_id)
        with self._lock:
            os.replace(tmp, path)
            self._entries[job.scene_id] = _Entry(job.url, path, size)
            self._entries.move_to_end(job.scene_id)
            victims = []
            while len(self._entries) > self.max_files:
                victims.append(self._entries.popitem(last=False))
        for _sid, entry in victims:
            _remove(entry.path)
        self._write_index()
        evicted = [sid for sid, _ in victims]
        if evicted:
            _LOGGER.info("download cache full: evicted %s", evicted)
        return path, evicted


def _conflict(scene_id: str, old_url: str, new_url: str, state: str) -> DownloadConflict:
    return DownloadConflict(
        f"x-nre-scene-id: scene {quoted(scene_id)} is {state} from {quoted(old_url, URL_CHARS)}; "
        f"refusing {quoted(new_url, URL_CHARS)} (use another scene id for another URL)"
    )


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _LOGGER.warning("download cache: cannot remove %s: %s", path, e)
