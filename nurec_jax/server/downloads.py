"""One hardened HTTP(S) downloader for every file nurec-jax fetches from a URL: the scenes clients name
with `x-nre-scene-url` (`download_cache.py`) and the `--difix-url` post-processing model
(`postprocess.py`). Both follow the same rules, set by the server's `--download-*` flags:

- Only `http://` and `https://`: a path on the server's own disk never comes from a URL, and the refusal
  never looks at the disk, so it tells nothing about which files exist.
- Destinations (`DestinationPolicy`): the host is resolved once, every address it resolves to is checked
  (loopback, private, link-local, multicast, unspecified, reserved and other non-global ranges, IPv4 and
  IPv6, with IPv4 embedded in IPv6 unwrapped) unless `--download-allow-private` or an entry of
  `--download-allow-hosts` (a host name, `.suffix`, or an IP / CIDR) allows it, and the connection is
  opened to exactly those checked addresses (the Host header and TLS SNI keep the name), so a DNS answer
  that changes between check and connect changes nothing. Redirects are followed by hand, at most
  `MAX_REDIRECTS`, each destination checked the same way. (`urllib` resolves and redirects on its own, so
  none of this could hold with it.)
- Bounds (`Limits`): `--download-max-bytes` (from Content-Length before the body is read, and while
  streaming), `--download-timeout-s` for the whole transfer, `--download-stall-timeout-s` without a byte.
- Cancellation: a `Transfer` can be aborted from any thread; a blocked read returns at once.
- Files are written atomically (`fetch_file`): streamed into a hidden partial file beside the target,
  validated, then renamed; a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import urllib.parse

import grpc

from nurec_jax.server.request_errors import RequestError, quoted

_LOGGER = logging.getLogger(__name__)

REMOTE_SCHEMES = ("http", "https")
MAX_REDIRECTS = 5
PART_MARK = ".part"  # every partial file's name contains it (ours and fileio.atomic_file's)
URL_CHARS = 256  # longest part of a URL quoted in a message
_CHUNK = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)


class DownloadError(RequestError):
    """A file could not be fetched because of what was asked for (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DownloadUnavailable(DownloadError):
    """A file could not be fetched for a reason that may pass (network, stall, timeout, HTTP 5xx)."""

    code = grpc.StatusCode.UNAVAILABLE


def check_url(url: str, local_hint: str = "") -> str:
    """Returns `url` when it is an http(s) URL with a host; DownloadError otherwise.

    Local paths (`file://`, absolute or relative paths) are refused without looking at the disk;
    `local_hint` says where such files go instead."""
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise DownloadError(f"{quoted(url, URL_CHARS)} is not a valid URL") from None
    scheme = parsed.scheme.lower()
    if scheme in ("", "file"):
        raise DownloadError(
            "local paths are not accepted; give an http:// or https:// URL" + (f" ({local_hint})" if local_hint else "")
        )
    if scheme not in REMOTE_SCHEMES:
        raise DownloadError(f"unsupported URL scheme {quoted(scheme)} (allowed: http, https)")
    if not parsed.hostname:
        raise DownloadError(f"URL {quoted(url, URL_CHARS)} has no host")
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
    for kind, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    ):
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
                    "(allow them with --download-allow-private or --download-allow-hosts)"
                )
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

    def __init__(self, host, port, *, addresses, transfer, timeout, **kwargs):
        super().__init__(host, port, timeout=timeout, **kwargs)
        self._addresses = addresses
        self._transfer = transfer
        self._create_connection = self._pinned  # http.client's hook for opening the socket

    def _pinned(self, address, timeout=None, source_address=None):
        sock = _connect_any(self._addresses, timeout)
        self._transfer.attach(sock)
        return sock

    def connect(self):
        super().connect()
        self._transfer.attach(self.sock)  # for https: the TLS socket that replaced the plain one


class _PinnedHTTPSConnection(_PinnedHTTPConnection, http.client.HTTPSConnection):
    """The same for https; certificate and SNI use the URL's host name, not the address."""


# ------------------------------------------------------------------------------------------------
# Limits and transfers


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on one download (the server's `--download-*` flags)."""

    max_bytes: int = 8 << 30
    timeout_s: float = 1800.0
    stall_timeout_s: float = 60.0

    @classmethod
    def from_options(cls, options) -> "Limits":
        return cls(options.download_max_bytes, options.download_timeout_s, options.download_stall_timeout_s)


def policy_from_options(options) -> DestinationPolicy:
    return DestinationPolicy(options.download_allow_private, tuple(options.download_allow_hosts))


class Transfer:
    """One download in progress, stoppable from another thread: `abort(error)` shuts its socket down, so a
    blocked read returns at once, and every later `check()` raises `error`."""

    def __init__(self, url: str):
        self.url = url
        self.bytes_read = 0
        self.error: DownloadError | None = None
        self._sock = None
        self._lock = threading.Lock()

    def abort(self, error: DownloadError) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            sock = self._sock
        _shutdown(sock)

    def attach(self, sock) -> None:
        with self._lock:
            self._sock = sock
            aborted = self.error is not None
        if aborted:
            _shutdown(sock)

    @property
    def aborted(self) -> bool:
        return self.error is not None

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def _shutdown(sock) -> None:
    if sock is None:
        return
    try:  # the plain socket call, also for a TLS socket: its TLS state stays with the reading thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError, AttributeError, TypeError):
        pass


@contextlib.contextmanager
def time_bound(transfer: Transfer, limits: Limits):
    """Aborts `transfer` when the block takes longer than `limits.timeout_s`."""
    timer = threading.Timer(
        limits.timeout_s,
        transfer.abort,
        (DownloadUnavailable(f"took longer than {limits.timeout_s:g} s (--download-timeout-s)"),),
    )
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# ------------------------------------------------------------------------------------------------
# The download


def fetch(
    transfer: Transfer, out, policy: DestinationPolicy, limits: Limits, ssl_context: ssl.SSLContext | None = None
) -> int:
    """Streams `transfer.url` into the binary file object `out` under `policy` and `limits` (not the
    total time: see `time_bound`); returns the byte count. Raises DownloadError / DownloadUnavailable."""
    url = transfer.url
    for _hop in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in REMOTE_SCHEMES or not parts.hostname:
            raise DownloadError(f"redirected to {quoted(url, URL_CHARS)}, which is not an http(s) URL")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise DownloadError(f"redirected to {quoted(url, URL_CHARS)}, which is not a valid URL") from None
        addresses = policy.resolve(parts.hostname, port)
        transfer.check()
        cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        kwargs = {}
        if scheme == "https":
            kwargs["context"] = ssl_context or ssl.create_default_context()
        conn = cls(
            parts.hostname, port, addresses=addresses, transfer=transfer, timeout=limits.stall_timeout_s, **kwargs
        )
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
            return _stream(transfer, resp, out, limits)
        except DownloadError:
            raise
        except (TimeoutError, socket.timeout):
            transfer.check()
            raise DownloadUnavailable(
                f"no data for {limits.stall_timeout_s:g} s (--download-stall-timeout-s)"
            ) from None
        except Exception as e:  # noqa: BLE001 - OSError, http.client errors, a socket shut down by abort
            transfer.check()
            raise DownloadUnavailable(f"connection failed ({type(e).__name__}: {e})") from None
        finally:
            conn.close()
    raise DownloadError(f"more than {MAX_REDIRECTS} redirects")


def _stream(transfer: Transfer, resp, out, limits: Limits) -> int:
    limit = limits.max_bytes
    length = resp.getheader("Content-Length")
    expected = None
    if length is not None:
        try:
            expected = int(length)
        except ValueError:
            raise DownloadError(f"invalid Content-Length {quoted(length)}") from None
        if expected > limit:
            raise DownloadError(f"the file is {expected} bytes, above the limit of {limit} (--download-max-bytes)")
    total = 0
    while True:
        transfer.check()
        chunk = resp.read1(min(_CHUNK, limit - total + 1))  # one socket read: returns as bytes arrive
        if not chunk:
            break
        total += len(chunk)
        transfer.bytes_read = total
        if total > limit:
            raise DownloadError(f"the file exceeds the download limit of {limit} bytes (--download-max-bytes)")
        out.write(chunk)
    transfer.check()  # an abort shuts the socket down, which reads as the end of the body
    if expected is not None and total != expected:
        raise DownloadUnavailable(f"connection closed after {total} of {expected} bytes")
    return total


def fetch_file(
    url: str,
    path: str,
    policy: DestinationPolicy,
    limits: Limits,
    validate=None,
    ssl_context: ssl.SSLContext | None = None,
    transfer: Transfer | None = None,
) -> int:
    """Downloads `url` to `path` atomically: streamed into a hidden partial file beside `path`,
    `validate(partial_path)` (raising when the content is unusable), then renamed. Nothing is left
    behind on failure. Returns the byte count; raises DownloadError / DownloadUnavailable, or what
    `validate` raises."""
    check_url(url)
    transfer = transfer or Transfer(url)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=PART_MARK, dir=folder)
    try:
        with time_bound(transfer, limits), os.fdopen(fd, "wb") as out:
            size = fetch(transfer, out, policy, limits, ssl_context)
        transfer.check()
        if validate is not None:
            validate(tmp)
        os.replace(tmp, path)
        tmp = None
        return size
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
