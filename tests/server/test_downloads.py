"""Scene downloads (x-nre-scene-url / x-nre-scene-id): only http(s), destination checks after name
resolution and on every redirect, size / time / stall bounds, a download pool of its own, shared
downloads that stop when nobody waits any more, and a cache that survives restarts and failures.

A small local web server (`web`) serves files, redirects, drips and endless bodies and records what each
request got; every route stops on its own within a minute, whatever the client does."""

from __future__ import annotations

import collections
import http.server
import io
import logging
import os
import re
import ssl
import threading
import time
import zipfile

import grpc
import pytest
from grpc_helpers import connect

from nurec_jax._proto import common_pb2, sensorsim_pb2
from nurec_jax.server.app import create_server
from nurec_jax.server.download_cache import DownloadCache
from nurec_jax.server.downloads import (
    DestinationPolicy,
    DownloadError,
    DownloadUnavailable,
    address_kind,
    parse_allow_entry,
)
from nurec_jax.server.options import ServerOptions
from nurec_jax.server.registry import SceneRegistry, discover_artifacts
from nurec_jax.server.request_errors import AlreadyExists, InvalidArgument

pytestmark = pytest.mark.xdist_group("grpc")

E = common_pb2.Empty()
LOOPBACK = DestinationPolicy(allow_private=True)
_ROUTE_LIMIT_S = 60.0  # no route runs longer than this, whatever the client does


class Web:
    """Routes: path -> handler(request_handler, record). `record` collects what the route sent; `wait_for`
    waits for what the requests and routes record."""

    def __init__(self):
        self.routes = {}
        self.gets = collections.Counter()
        self.records: dict[str, list[dict]] = collections.defaultdict(list)
        self._changed = threading.Condition()  # notified on every change of `gets` and `records`
        web = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                route = web.routes.get(path)
                rec = {"sent": 0, "aborted": False, "done": False}
                with web._changed:
                    web.gets[path] += 1
                    if route is not None:
                        web.records[path].append(rec)
                    web._changed.notify_all()
                if route is None:
                    self.send_error(404)
                    return
                try:
                    route(self, rec)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    web._record(rec, aborted=True)
                finally:
                    web._record(rec, done=True)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _record(self, rec: dict, sent: int = 0, **changes) -> None:
        with self._changed:
            rec["sent"] += sent
            rec.update(changes)
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        """Whether `predicate()` (reading `gets` / `records`) came true within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def use_tls(self, cert: str, key: str):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https"

    # -- routes ----------------------------------------------------------------------------

    def file(self, path: str, data: bytes, chunk: int = 0, pause_s: float = 0.0, length: int | None = None):
        """`data` with Content-Length (`length` overrides it: a lie), optionally in paced chunks."""

        def route(h, rec):
            h.send_response(200)
            h.send_header("Content-Length", str(len(data) if length is None else length))
            h.end_headers()
            step = chunk or len(data) or 1
            for i in range(0, len(data), step):
                h.wfile.write(data[i : i + step])
                h.wfile.flush()
                self._record(rec, sent=len(data[i : i + step]))
                if pause_s:
                    time.sleep(pause_s)  # the behaviour under test: a slow server

        self.routes[path] = route

    def redirect(self, path: str, location: str, status: int = 302):
        def route(h, rec):
            h.send_response(status)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = route

    def drip(self, path: str, pause_s: float, piece: bytes = b"\0", length: int | None = 10 << 20):
        """A body of `length` bytes (None: no Content-Length, endless) sent `piece` every `pause_s` seconds."""

        def route(h, rec):
            h.send_response(200)
            if length is not None:
                h.send_header("Content-Length", str(length))
            h.end_headers()
            h.wfile.flush()
            end = time.monotonic() + _ROUTE_LIMIT_S
            while time.monotonic() < end and (length is None or rec["sent"] < length):
                h.wfile.write(piece)
                h.wfile.flush()
                self._record(rec, sent=len(piece))
                if pause_s:
                    time.sleep(pause_s)  # the behaviour under test: a dripping body

        self.routes[path] = route

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def web():
    w = Web()
    yield w
    w.close()


class DownloadEnds(logging.Handler):
    """Counts the downloads that ended, from the download cache's log: its download thread logs one line per
    download ("downloaded scene ..." or "download of scene <id>: <why>") once the partial file is gone."""

    _END = re.compile(r"downloaded scene |download of scene \S+: ")

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if self._END.match(record.getMessage()):
            with self._changed:
                self.count += 1
                self._changed.notify_all()

    def wait(self, count: int, timeout: float = 10.0) -> bool:
        """Whether `count` downloads have ended within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, timeout)


@pytest.fixture
def download_ends():
    logger = logging.getLogger("nurec_jax.server.download_cache")
    ends, level = DownloadEnds(), logger.level
    logger.addHandler(ends)
    logger.setLevel(logging.INFO)
    yield ends
    logger.removeHandler(ends)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def scene_bytes(thin_scene):
    with open(thin_scene, "rb") as f:
        return f.read()


def _zip_bytes(**members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return buf.getvalue()


def _files(directory) -> list[str]:
    """The cache directory's files, without the lock file a live cache holds."""
    return sorted(n for n in os.listdir(directory) if n != ".lock")


def _cache(directory, **kw) -> DownloadCache:
    kw.setdefault("policy", LOOPBACK)
    return DownloadCache(str(directory), **kw)


# ------------------------------------------------------------------------------------------------
# Destinations


@pytest.mark.parametrize(
    "address,kind",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-global"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),
        ("64:ff9b::a00:1", "private"),
        ("fe80::1%1", "link-local"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_address_kinds(address, kind):
    assert address_kind(address) == kind


def test_destination_policy_and_allow_list():
    with pytest.raises(DownloadError, match="'127.0.0.1' resolves to a loopback address.*--download-allow-private"):
        DestinationPolicy().resolve("127.0.0.1", 80)
    with pytest.raises(DownloadError, match="loopback"):
        DestinationPolicy().resolve("localhost", 80)
    assert DestinationPolicy(allow_hosts=("localhost",)).resolve("localhost", 80)
    assert DestinationPolicy(allow_hosts=(".localdomain", "127.0.0.0/8")).resolve("127.0.0.1", 80)
    with pytest.raises(DownloadError, match="loopback"):  # the name is allowed, not every address
        DestinationPolicy(allow_hosts=("localhost",)).resolve("127.0.0.1", 80)
    assert DestinationPolicy(allow_private=True).resolve("127.0.0.1", 80) == [(2, ("127.0.0.1", 80))]
    for bad in ("bad host!", "", "-x.com", "10.0.0.0/33"):
        with pytest.raises(ValueError):
            parse_allow_entry(bad)
    with pytest.raises(ValueError, match="--download-allow-hosts"):
        ServerOptions(download_allow_hosts=("bad host!",)).validate()
    for field, value in (
        ("download_workers", 0),
        ("download_timeout_s", 0),
        ("download_stall_timeout_s", -1),
        ("download_max_bytes", 0),
    ):
        with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
            ServerOptions(**{field: value}).validate()
    assert ServerOptions().download_max_bytes == 8 << 30 and not ServerOptions().download_allow_private


def test_loopback_and_redirects_are_checked(tmp_path, web, scene_bytes):
    web.file("/s.usdz", scene_bytes)
    web.redirect("/to-loopback", web.url("/s.usdz"))
    web.redirect("/loop", "/loop")
    web.redirect("/to-file", "file:///etc/passwd")
    # Refused by default, before any connection.
    with pytest.raises(DownloadError, match="x-nre-scene-url: .*loopback address"):
        DownloadCache(str(tmp_path / "a")).fetch("s", web.url("/s.usdz"))
    assert web.gets["/s.usdz"] == 0
    # The first host is allowed by name; the redirect to 127.0.0.1 is checked again and refused.
    by_name = DownloadCache(str(tmp_path / "b"), policy=DestinationPolicy(allow_hosts=("localhost",)))
    with pytest.raises(DownloadError, match="'127.0.0.1' resolves to a loopback address"):
        by_name.fetch("s", web.url("/to-loopback", host="localhost"))
    assert web.gets["/to-loopback"] == 1 and web.gets["/s.usdz"] == 0
    assert by_name.fetch("s", web.url("/s.usdz", host="localhost")).endswith("s.usdz")
    # With private destinations allowed, redirects are followed, a few at most, to http(s) only.
    cache = _cache(tmp_path / "c")
    assert os.path.getsize(cache.fetch("s", web.url("/to-loopback"))) == len(scene_bytes)
    with pytest.raises(DownloadError, match="more than 5 redirects"):
        cache.fetch("t", web.url("/loop"))
    assert web.gets["/loop"] == 6
    with pytest.raises(DownloadError, match="redirected to 'file:///etc/passwd', which is not an http"):
        cache.fetch("u", web.url("/to-file"))
    assert _files(tmp_path / "c") == ["index.json", "s.usdz"]


def test_https_connects_to_the_checked_address_and_verifies_the_name(tmp_path, web, scene_bytes):
    tls = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tls")
    web.use_tls(os.path.join(tls, "server.pem"), os.path.join(tls, "server.key"))
    web.file("/s.usdz", scene_bytes)
    trust = ssl.create_default_context(cafile=os.path.join(tls, "ca.pem"))
    policy = DestinationPolicy(allow_hosts=("localhost",))
    cache = DownloadCache(str(tmp_path / "a"), policy=policy, ssl_context=trust)
    assert os.path.getsize(cache.fetch("s", web.url("/s.usdz", host="localhost"))) == len(scene_bytes)
    untrusted = DownloadCache(str(tmp_path / "b"), policy=policy)  # the system CAs do not know the test CA
    with pytest.raises(DownloadUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.fetch("s", web.url("/s.usdz", host="localhost"))
    assert _files(tmp_path / "b") == []


# ------------------------------------------------------------------------------------------------
# Bounds


def test_size_bounds(tmp_path, web, scene_bytes):
    web.drip("/huge", pause_s=0.05, length=10**12)  # announces 1 TB, then sends slowly
    web.drip("/endless", pause_s=0.0, piece=b"\0" * 4096, length=None)  # no Content-Length, never ends
    web.file("/short", scene_bytes[:1000], length=len(scene_bytes))  # closes before its Content-Length
    cache = _cache(tmp_path, max_bytes=64 << 10, stall_timeout_s=30.0)
    # Refused from Content-Length alone: with a 30 s stall bound, reading the drip would take far longer.
    with pytest.raises(DownloadError, match="is 1000000000000 bytes, above the limit of 65536"):
        cache.fetch("huge", web.url("/huge"))
    # A body without a length is stopped while streaming, just past the bound.
    with pytest.raises(DownloadError, match="exceeds the download limit of 65536 bytes"):
        cache.fetch("endless", web.url("/endless"))
    assert web.wait_for(lambda: web.records["/endless"] and web.records["/endless"][0]["done"])
    assert web.records["/endless"][0]["aborted"] and web.records["/endless"][0]["sent"] < 64 << 20
    with pytest.raises(DownloadUnavailable, match="connection closed after 1000 of"):
        _cache(tmp_path, stall_timeout_s=30.0).fetch("short", web.url("/short"))
    assert _files(tmp_path) == []


def test_stall_and_total_timeouts(tmp_path, web):
    web.drip("/drip", pause_s=1.0)  # 10 MiB at a byte a second: weeks
    web.drip("/trickle", pause_s=0.02)  # a byte every 20 ms: never stalls, never ends
    with pytest.raises(DownloadUnavailable, match=r"no data for 0\.3 s \(--download-stall-timeout-s\)"):
        _cache(tmp_path, stall_timeout_s=0.3).fetch("d", web.url("/drip"))
    with pytest.raises(DownloadUnavailable, match=r"took longer than 0\.5 s \(--download-timeout-s\)"):
        _cache(tmp_path, stall_timeout_s=5.0, timeout_s=0.5).fetch("t", web.url("/trickle"))
    assert web.wait_for(lambda: all(r["done"] for recs in web.records.values() for r in recs))
    assert all(r["aborted"] for recs in web.records.values() for r in recs)
    assert _files(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Sharing and cancellation


def test_waiters_share_one_download_and_the_last_one_stops_it(tmp_path, web, scene_bytes, download_ends):
    web.file("/s.usdz", scene_bytes, chunk=64 << 10, pause_s=0.02)
    web.drip("/slow.usdz", pause_s=0.02, piece=b"\0" * 1024)
    cache = _cache(tmp_path)
    first, second = cache.request("s", web.url("/s.usdz")), cache.request("s", web.url("/s.usdz"))
    first.release()  # one client gives up; the other still waits, so the download goes on
    assert second.wait(30).endswith("s.usdz") and web.gets["/s.usdz"] == 1
    with pytest.raises(DownloadError, match="is already cached from '.*/s.usdz'; refusing '.*/other.usdz'"):
        cache.request("s", web.url("/other.usdz"))
    # Every waiter gives up: the download stops (the server sees the connection go) and leaves nothing.
    a, b = cache.request("slow", web.url("/slow.usdz")), cache.request("slow", web.url("/slow.usdz"))
    with pytest.raises(DownloadError, match="is being downloaded from"):
        cache.request("slow", web.url("/s.usdz"))
    assert web.wait_for(lambda: web.records["/slow.usdz"] and web.records["/slow.usdz"][0]["sent"] > 0)
    a.release()
    b.release()
    assert web.wait_for(lambda: web.records["/slow.usdz"][0]["done"])
    assert web.records["/slow.usdz"][0]["aborted"] and web.records["/slow.usdz"][0]["sent"] < 10 << 20
    assert a.future.cancelled() and b.future.cancelled()
    assert download_ends.wait(2)  # "s" and "slow"
    assert _files(tmp_path) == ["index.json", "s.usdz"]
    cache.close()


# ------------------------------------------------------------------------------------------------
# The cache: failures, restarts, conflicts


def test_failed_downloads_leave_nothing_and_evict_nothing(tmp_path, web, scene_bytes):
    web.file("/s1.usdz", scene_bytes)
    web.file("/junk.usdz", b"x" * 5000)
    web.file("/zip.usdz", _zip_bytes(**{"readme.txt": "a zip, but no scene"}))
    reg = SceneRegistry({}, _cache(tmp_path, max_files=1))
    dropped = []
    reg.on_unregister = dropped.append
    reg.register("s1", web.url("/s1.usdz"))
    before = _files(tmp_path)
    with pytest.raises(DownloadError, match="not a .usdz \\(zip\\) archive"):
        reg.register("junk", web.url("/junk.usdz"))
    with pytest.raises(DownloadError, match="not a readable scene") as info:
        reg.register("zip", web.url("/zip.usdz"))
    assert str(tmp_path) not in str(info.value) and ".part" not in str(info.value)  # no server paths
    with pytest.raises(InvalidArgument, match="x-nre-scene-id: .* is longer than 200 characters"):
        reg.register("x" * 201, web.url("/s1.usdz"))
    assert _files(tmp_path) == before == ["index.json", "s1.usdz"]
    assert reg.ids() == ["s1"] and dropped == [] and reg.metadata("s1").scene_id == "s1"


def test_restart_reindexes_the_cache(tmp_path, web, scene_bytes):
    for name in ("s1", "s2", "s3"):
        web.file(f"/{name}.usdz", scene_bytes)
    (tmp_path / ".s9.abc.part.usdz").write_bytes(b"half a download")  # left by a crash
    (tmp_path / ".index.json.xyz.part").write_bytes(b"{")
    reg = SceneRegistry({}, _cache(tmp_path, max_files=2))
    assert _files(tmp_path) == []  # stale partial files removed at start
    reg.register("s1", web.url("/s1.usdz"))
    reg.register("s2", web.url("/s2.usdz"))
    # While a server uses the directory, another one leaves its partial files alone.
    (tmp_path / ".s2.live.part.usdz").write_bytes(b"in progress")
    _cache(tmp_path, max_files=2).close()
    assert ".s2.live.part.usdz" in _files(tmp_path)
    reg.close()  # the first server ends
    # A new server on the same directory removes the partial file and knows both scenes and their URLs.
    reg2 = SceneRegistry({}, _cache(tmp_path, max_files=2))
    assert ".s2.live.part.usdz" not in _files(tmp_path)
    assert reg2.ids() == ["s1", "s2"] and reg2.metadata("s2").scene_id == "s2"
    reg2.register("s1", web.url("/s1.usdz"))  # served from disk: no second fetch; s1 is now most recent
    assert web.gets["/s1.usdz"] == 1
    long_url = web.url("/s1.usdz") + "?" + "q" * 5000
    with pytest.raises(InvalidArgument, match="x-nre-scene-url: .*longer than 4096"):
        reg2.register("s1", long_url)
    other = web.url("/s3.usdz") + "?" + "q" * 1000
    with pytest.raises(AlreadyExists) as info:
        reg2.register("s1", other)
    msg = str(info.value)
    assert msg.startswith("x-nre-scene-id: scene 's1' is already registered from ")
    assert web.url("/s1.usdz") in msg and "/s3.usdz?qqq" in msg and "(1" in msg and len(msg) < 800
    dropped = []
    reg2.on_unregister = dropped.append
    reg2.register("s3", web.url("/s3.usdz"))  # the re-indexed files count: the least recent one goes
    assert reg2.ids() == ["s1", "s3"] and dropped == ["s2"]
    assert _files(tmp_path) == ["index.json", "s1.usdz", "s3.usdz"]
    # Lower capacity at the next start: the oldest files are evicted at once; files without a URL count too.
    (tmp_path / "legacy.usdz").write_bytes(scene_bytes)
    os.utime(tmp_path / "legacy.usdz", (1, 1))
    reg2.close()
    small = _cache(tmp_path, max_files=2)
    assert [sid for sid, _, _ in small.entries()] == ["s1", "s3"]
    assert _files(tmp_path) == ["index.json", "s1.usdz", "s3.usdz"]


def test_artifact_glob_matching_nothing_warns(tmp_path, caplog):
    pattern = str(tmp_path / "**" / "*.usdz")
    with caplog.at_level(logging.WARNING, logger="nurec_jax.server.registry"):
        assert discover_artifacts(pattern) == ({}, {})
    assert any(pattern in r.getMessage() and "matched no" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# Through the server


@pytest.fixture
def served(tmp_path, web):
    opts = ServerOptions(
        port=0,
        download_cache_dir=str(tmp_path / "dl"),
        download_allow_private=True,
        download_workers=2,
        download_stall_timeout_s=20.0,
    )
    srv, port = create_server("127.0.0.1:0", opts)
    channel, stub = connect(port)
    yield srv, stub, web
    channel.close()
    srv.stop(0.5)


def _md(url: str, sid: str):
    return (("x-nre-scene-url", url), ("x-nre-scene-id", sid))


def _cams(sid: str):
    return sensorsim_pb2.AvailableCamerasRequest(scene_id=sid)


def test_server_refuses_local_paths_and_downloads_http(served, scene_bytes):
    srv, stub, web = served
    web.file("/s.usdz", scene_bytes)
    details = set()
    for url in ("file:///etc/passwd", "/etc/shadow", "file:///proc/self/environ", "/no/such/file.usdz"):
        with pytest.raises(grpc.RpcError) as info:
            stub.get_version(E, metadata=_md(url, "leak"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details.add(info.value.details())
    assert len(details) == 1 and next(iter(details)).startswith("x-nre-scene-url: local paths are not accepted")
    assert list(stub.get_available_scenes(E, timeout=10).scene_ids) == []
    cams = stub.get_available_cameras(_cams("mine"), metadata=_md(web.url("/s.usdz"), "mine"), timeout=30)
    assert len(cams.available_cameras) == 4
    assert list(stub.get_available_scenes(E, timeout=10).scene_ids) == ["mine"]
    with pytest.raises(grpc.RpcError) as info:
        stub.get_version(E, metadata=_md(web.url("/elsewhere.usdz"), "mine"), timeout=10)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "/s.usdz" in info.value.details() and "/elsewhere.usdz" in info.value.details()
    assert stub.get_available_cameras(_cams("mine"), metadata=_md(web.url("/s.usdz"), "mine"), timeout=10)
    assert web.gets["/s.usdz"] == 1


def test_server_metadata_answers_during_slow_downloads_and_cancel_stops_them(served, download_ends):
    srv, stub, web = served
    for i in range(4):
        web.drip(f"/slow{i}.usdz", pause_s=0.05, piece=b"\0" * 1024)
    calls = [
        stub.get_available_cameras.future(
            _cams(f"slow{i}"), metadata=_md(web.url(f"/slow{i}.usdz"), f"slow{i}"), timeout=60
        )
        for i in range(4)
    ]
    # Two download threads are busy (the other two downloads queue); metadata workers are all free.
    assert web.wait_for(lambda: sum(web.gets.values()) >= 2)
    for _ in range(3):
        assert stub.get_available_scenes(E, timeout=10).scene_ids == []
        assert stub.get_version(E, timeout=10).version_id
    started = [r for recs in list(web.records.values()) for r in recs]
    for c in calls:
        c.cancel()
    assert started and web.wait_for(lambda: all(r["done"] for r in started))
    assert all(r["aborted"] and r["sent"] < 10 << 20 for r in started)
    # A deadline that passes during the download stops it too, and the call says why.
    web.drip("/late.usdz", pause_s=0.05, piece=b"\0" * 1024)
    with pytest.raises(grpc.RpcError) as info:
        stub.get_available_cameras(_cams("late"), metadata=_md(web.url("/late.usdz"), "late"), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert web.wait_for(lambda: web.records["/late.usdz"] and web.records["/late.usdz"][0]["done"])
    assert web.records["/late.usdz"][0]["aborted"]
    assert stub.get_available_scenes(E, timeout=10).scene_ids == []
    assert download_ends.wait(5)  # the four cancelled ones (two never started) and the late one
    assert _files(srv.options.download_cache_dir) == []


# ------------------------------------------------------------------------------------------------
# serve-grpc flags


def test_serve_grpc_download_flags(tmp_path):
    import subprocess
    import sys

    code = (
        "from absl import flags; from nurec_jax.cli import serve_grpc, _flags; "
        "flags.FLAGS(_flags.normalize_argv(['x', '--download-allow-private', '--download-allow-hosts=a.example,"
        "10.0.0.0/8', '--download-timeout-s=9', '--download-stall-timeout-s', '2.5', '--download-workers=3', "
        "'--download-max-bytes=1000'])); o = serve_grpc.options_from_flags(); "
        "print(o.download_allow_private, o.download_allow_hosts, o.download_timeout_s, "
        "o.download_stall_timeout_s, o.download_workers, o.download_max_bytes)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True ('a.example', '10.0.0.0/8') 9.0 2.5 3 1000", out.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "nurec_jax.cli.serve_grpc",
            "--port=0",
            f"--download-cache-dir={tmp_path}",
            "--download-allow-hosts=bad host!",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "serve-grpc: --download-allow-hosts: 'bad host!' is neither a host name nor an IP address / CIDR"
    )
