"""The download cache behind the `x-nre-scene-url` / `x-nre-scene-id` request metadata.

Only `http://` and `https://` URLs are accepted: a path on the server's own disk never comes from the
network (scenes on local disk are served through `--artifact-glob` only), and the refusal never looks
at the disk, so it tells nothing about which files exist.

Where a download may go (`DestinationPolicy`): the host is resolved once, every address it resolves to
is checked (loopback, private, link-local, multicast, unspecified, reserved and other non-global ranges,
IPv4 and IPv6, with IPv4 embedded in IPv6 unwrapped) unless `--download-allow-private` or an entry of
`--download-allow-hosts` (a host name, `.suffix`, or an IP / CIDR) allows it, and the connection is
opened to exactly those checked addresses (the Host header and TLS SNI keep the name), so a DNS answer
that changes between check and connect changes nothing. Redirects are followed by hand, at most
`MAX_REDIRECTS`, each destination checked the same way.

Bounds: `--download-max-bytes` (from Content-Length before the body is read, and while streaming),
`--download-timeout-s` for the whole download and `--download-stall-timeout-s` without a byte. Downloads
run on their own `--download-workers` threads; clients wait for them without holding a thread. Clients
asking for the same scene id share one download, which stops when the last of them gives up.

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
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import urllib.parse
import zipfile

import grpc

from nurec_jax.fileio import atomic_file
from nurec_jax.server.errors import RequestError, quoted

_LOGGER = logging.getLogger(__name__)

SCENE_ID_RE = re.compile(r"^[.a-zA-Z0-9_-]+$")
MAX_SCENE_ID_CHARS = 200  # a downloaded scene id names a file (<id>.usdz and its partial file)
REMOTE_SCHEMES = ("http", "https")
MAX_REDIRECTS = 5
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
PART_MARK = ".part"  # every temporary name in the cache directory contains it (ours and fileio.atomic_file's)
_CHUNK = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)
_HEADER = "x-nre-scene-url"
_URL_CHARS = 256  # longest part of a URL quoted in a message


class DownloadError(RequestError):
    """A scene could not be fetched because of what the client asked for (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DownloadUnavailable(DownloadError):
    """A scene could not be fetched for a reason that may pass (network, stall, timeout, HTTP 5xx)."""

    code = grpc.StatusCode.UNAVAILABLE


class DownloadConflict(DownloadError):
    """The scene id is already bound to another URL (ALREADY_EXISTS)."""

    code = grpc.StatusCode.ALREADY_EXISTS


def parse_scene_url(url: str) -> str:
    """Returns `url` when it is an http(s) URL with a host; DownloadError otherwise.

    Local paths (`file://`, absolute or relative paths) are refused without looking at the disk."""
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise DownloadError(f"{quoted(url, _URL_CHARS)} is not a valid URL") from None
    scheme = parsed.scheme.lower()
    if scheme in ("", "file"):
        raise DownloadError("local paths are not accepted from the network; give an http:// or https:// URL "
                            "(scenes on the server's disk are served through --artifact-glob)")
    if scheme not in REMOTE_SCHEMES:
        raise DownloadError(f"unsupported URL scheme {quoted(scheme)} (allowed: http, https)")
    if not parsed.hostname:
        raise DownloadError(f"URL {quoted(url, _URL_CHARS)} has no host")
    return url


# ------------------------------------------------------------------------------------------------
# Destinations

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_kind(address: str) -> str | None:
    """Why an address is not a public destination ("loopback", "private", ...), or None when it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6:  # IPv4 carried inside IPv6 is judged as the IPv4 address it reaches
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for kind, flag in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if flag:
            return kind
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "non-global"
    return None


_HOSTNAME_RE = re.compile(r"^\.?(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?$")


def parse_allow_entry(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """An allow-list entry -> an IP network, or a lower-case host name (`.suffix` for a domain)."""
    text = entry.strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    if not name or not _HOSTNAME_RE.match(name):
        raise ValueError(f"{entry!r} is neither a host name nor an IP address / CIDR")
    return name


@dataclasses.dataclass(frozen=True)
class DestinationPolicy:
    """Which hosts a download may connect to (module docstring)."""

    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()

    def __post_init__(self):
        parsed = [parse_allow_entry(e) for e in self.allow_hosts]
        object.__setattr__(self, "_names", tuple(p for p in parsed if isinstance(p, str)))
        object.__setattr__(self, "_networks", tuple(p for p in parsed if not isinstance(p, str)))

    def _name_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == n or (n.startswith(".") and host.endswith(n)) for n in self._names)

    def _address_allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        return any(ip.version == net.version and ip in net for net in self._networks)

    def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        """Resolves `host` once and checks every address; returns [(family, sockaddr)] to connect to.

        Raises DownloadError naming the kind of address refused (not the address itself)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as e:
            raise DownloadUnavailable(f"cannot resolve host {quoted(host)} ({type(e).__name__})") from None
        if not infos:
            raise DownloadUnavailable(f"host {quoted(host)} has no address")
        trusted = self.allow_private or self._name_allowed(host)
        out = []
        for family, _type, _proto, _canon, sockaddr in infos:
            kind = None if trusted else address_kind(sockaddr[0])
            if kind is not None and not self._address_allowed(sockaddr[0]):
                raise DownloadError(
                    f"host {quoted(host)} resolves to a {kind} address; downloads from such addresses are refused "
                    "(allow them with --download-allow-private or --download-allow-hosts)")
            if (family, sockaddr) not in out:
                out.append((family, sockaddr))
        return out


def _connect_any(addresses: list[tuple[int, tuple]], timeout: float | None) -> socket.socket:
    """Connects to the first of the checked addresses that answers."""
    error: OSError | None = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError("no address to connect to")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection that goes to the addresses checked by `DestinationPolicy.resolve` only."""

    def __init__(self, host, port, *, addresses, job, timeout, **kwargs):
        super().__init__(host, port, timeout=timeout, **kwargs)
        self._addresses = addresses
        self._job = job
        self._create_connection = self._pinned  # http.client's hook for opening the socket

    def _pinned(self, address, timeout=None, source_address=None):
        sock = _connect_any(self._addresses, timeout)
        self._job.attach(sock)
        return sock

    def connect(self):
        super().connect()
        self._job.attach(self.sock)  # for https: the TLS socket that replaced the plain one


class _PinnedHTTPSConnection(_PinnedHTTPConnection, http.client.HTTPSConnection):
    """The same for https; certificate and SNI use the URL's host name, not the address."""


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


class _Job:
    """One download in progress: its waiters and a way to stop it from another thread."""

    def __init__(self, scene_id: str, url: str, validate, on_commit):
        self.scene_id, self.url = scene_id, url
        self.validate, self.on_commit = validate, on_commit
        self.waiters: list[Pending] = []
        self.finished = False
        self.bytes_read = 0
        self._abort: DownloadError | None = None
        self._sock = None
        self._lock = threading.Lock()

    def abort(self, error: DownloadError) -> None:
        """Stops the download: a blocked read returns at once (its socket is shut down)."""
        with self._lock:
            if self._abort is None:
                self._abort = error
            sock = self._sock
        _shutdown(sock)

    def attach(self, sock) -> None:
        with self._lock:
            self._sock = sock
            aborted = self._abort is not None
        if aborted:
            _shutdown(sock)

    @property
    def aborted(self) -> bool:
        return self._abort is not None

    def check(self) -> None:
        if self._abort is not None:
            raise self._abort


def _shutdown(sock) -> None:
    if sock is None:
        return
    try:  # the plain socket call, also for a TLS socket: its TLS state stays with the reading thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError, AttributeError, TypeError):
        pass


@dataclasses.dataclass
class _Entry:
    url: str | None  # None: a file found at start without a recorded URL
    path: str
    size: int


class DownloadCache:
    """An LRU of downloaded scene files, keyed by scene id (module docstring).

    `request(scene_id, url)` returns a `Pending`; `entries()` lists what is cached with its URL."""

    def __init__(self, directory: str, max_files: int = 5, max_bytes: int = 8 << 30, timeout_s: float = 1800.0,
                 stall_timeout_s: float = 60.0, workers: int = 2, policy: DestinationPolicy = DestinationPolicy(),
                 ssl_context: ssl.SSLContext | None = None):
        if max_files < 1:
            raise ValueError(f"download cache size must be >= 1, got {max_files}")
        if workers < 1:
            raise ValueError(f"download workers must be >= 1, got {workers}")
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s
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
        return cls(options.download_cache_dir, options.download_cache_size, options.download_max_bytes,
                   options.download_timeout_s, options.download_stall_timeout_s, options.download_workers,
                   DestinationPolicy(options.download_allow_private, tuple(options.download_allow_hosts)))

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
            _LOGGER.warning("download cache %s is used by another server process; its partial files are left "
                            "alone (give each server its own --download-cache-dir)", self.directory)
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
        _LOGGER.info("download cache %s: %d file(s) (%d without a recorded URL), %d evicted to fit %d",
                     self.directory, len(self._entries), sum(e.url is None for e in self._entries.values()),
                     len(victims), self.max_files)

    def _write_index(self) -> None:
        with self._lock:
            items = [{"scene_id": sid, "url": e.url, "size": e.size} for sid, e in self._entries.items()
                     if e.url is not None]
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
        prefix = f"{_HEADER}: Failed to download scene from {quoted(job.url, _URL_CHARS)}"
        timer = threading.Timer(self.timeout_s, job.abort, (DownloadUnavailable(
            f"{prefix}: took longer than {self.timeout_s:g} s (--download-timeout-s)"),))
        timer.daemon = True
        timer.start()
        tmp = None
        error: BaseException | None = None
        path, evicted = None, []
        try:
            job.check()
            fd, tmp = tempfile.mkstemp(prefix=f".{job.scene_id}.", suffix=f"{PART_MARK}.usdz", dir=self.directory)
            with os.fdopen(fd, "wb") as out:
                size = self._download(job, out)
            job.check()
            if not zipfile.is_zipfile(tmp):
                raise DownloadError("the file is not a .usdz (zip) archive")
            if job.validate is not None:
                try:
                    job.validate(tmp)
                except Exception as e:  # noqa: BLE001 - the file arrived but is no scene
                    # The client hears about its file, not about the server's directories.
                    text = str(e).replace(tmp, f"{job.scene_id}.usdz").replace(os.path.basename(tmp),
                                                                                f"{job.scene_id}.usdz")
                    raise DownloadError(f"the file is not a readable scene: {text}") from None
            job.check()
            path, evicted = self._commit(job, tmp, size)
            tmp = None
            if job.on_commit is not None:
                job.on_commit(job.scene_id, job.url, path, evicted)
        except DownloadError as e:
            if job.aborted and e is not job._abort:
                e = job._abort
            error = e if str(e).startswith(_HEADER) else type(e)(f"{prefix}: {e}")
        except Exception as e:  # noqa: BLE001 - reported to the waiters
            _LOGGER.error("download of %s failed", quoted(job.url, _URL_CHARS), exc_info=e)
            error = DownloadUnavailable(f"{prefix}: {type(e).__name__}: {e}")
        finally:
            timer.cancel()
            if tmp is not None:
                _remove(tmp)
        with self._lock:
            job.finished = True
            if self._jobs.get(job.scene_id) is job:
                del self._jobs[job.scene_id]
            waiters = list(job.waiters)
        if error is None:
            _LOGGER.info("downloaded scene %s from %s (%d bytes)", quoted(job.scene_id), quoted(job.url, _URL_CHARS),
                         job.bytes_read)
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

    def _download(self, job: _Job, out) -> int:
        url = job.url
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in REMOTE_SCHEMES or not parts.hostname:
                raise DownloadError(f"redirected to {quoted(url, _URL_CHARS)}, which is not an http(s) URL")
            try:
                port = parts.port or (443 if scheme == "https" else 80)
            except ValueError:
                raise DownloadError(f"redirected to {quoted(url, _URL_CHARS)}, which is not a valid URL") from None
            addresses = self.policy.resolve(parts.hostname, port)
            job.check()
            cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
            kwargs = {}
            if scheme == "https":
                kwargs["context"] = self.ssl_context or ssl.create_default_context()
            conn = cls(parts.hostname, port, addresses=addresses, job=job, timeout=self.stall_timeout_s, **kwargs)
            try:
                target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
                conn.request("GET", target, headers={"User-Agent": "nurec-jax", "Accept-Encoding": "identity"})
                resp = conn.getresponse()
                if resp.status in _REDIRECTS:
                    location = resp.getheader("Location")
                    if not location:
                        raise DownloadError(f"HTTP {resp.status} without a Location header")
                    url = urllib.parse.urljoin(url, location)
                    continue
                if resp.status != 200:
                    kind = DownloadUnavailable if resp.status >= 500 or resp.status == 429 else DownloadError
                    raise kind(f"HTTP Error {resp.status}: {quoted(resp.reason)}")
                return self._stream(job, resp, out)
            except DownloadError:
                raise
            except (TimeoutError, socket.timeout):
                job.check()
                raise DownloadUnavailable(f"no data for {self.stall_timeout_s:g} s "
                                          "(--download-stall-timeout-s)") from None
            except Exception as e:  # noqa: BLE001 - OSError, http.client errors, a socket shut down by abort
                job.check()
                raise DownloadUnavailable(f"connection failed ({type(e).__name__}: {e})") from None
            finally:
                conn.close()
        raise DownloadError(f"more than {MAX_REDIRECTS} redirects")

    def _stream(self, job: _Job, resp, out) -> int:
        limit = self.max_bytes
        length = resp.getheader("Content-Length")
        expected = None
        if length is not None:
            try:
                expected = int(length)
            except ValueError:
                raise DownloadError(f"invalid Content-Length {quoted(length)}") from None
            if expected > limit:
                raise DownloadError(f"scene is {expected} bytes, above the limit of {limit} (--download-max-bytes)")
        total = 0
        while True:
            job.check()
            chunk = resp.read1(min(_CHUNK, limit - total + 1))  # one socket read: returns as bytes arrive
            if not chunk:
                break
            total += len(chunk)
            job.bytes_read = total
            if total > limit:
                raise DownloadError(f"scene exceeds the download limit of {limit} bytes (--download-max-bytes)")
            out.write(chunk)
        job.check()  # an abort shuts the socket down, which reads as the end of the body
        if expected is not None and total != expected:
            raise DownloadUnavailable(f"connection closed after {total} of {expected} bytes")
        return total


def _conflict(scene_id: str, old_url: str, new_url: str, state: str) -> DownloadConflict:
    return DownloadConflict(f"x-nre-scene-id: scene {quoted(scene_id)} is {state} from {quoted(old_url, _URL_CHARS)}; "
                            f"refusing {quoted(new_url, _URL_CHARS)} (use another scene id for another URL)")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _LOGGER.warning("download cache: cannot remove %s: %s", path, e)
