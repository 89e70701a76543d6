"""Safe reading of `.usdz` (zip) archives.

Every member name is validated (no absolute paths, no `..`), and USD layers are only ever extracted
below a temporary directory that this module creates. Zip bombs are stopped while inflating, from
the bytes actually produced (a member's header sizes are checked too, but never relied on): each
member has a size limit, all reads of one `Archive` share a total budget, and a member that inflates
more than `max_ratio` times its compressed size is refused once it passes `ratio_floor` bytes.
A refused read drops what it had inflated before raising, so a failed load leaves no buffer behind
(not even in the traceback of the error it raises).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import zipfile
import zlib
from typing import Any

from nurec_jax.errors import SceneFormatError

USD_SUFFIXES = (".usda", ".usdc", ".usd")
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what reading one archive may inflate.

    Attributes:
      member_bytes: largest inflated member (a caller may pass a smaller limit per read).
      total_bytes: most bytes all reads of one `Archive` may inflate together (re-reads count again).
      max_ratio: largest inflated / compressed size of a member; 0 (or None) turns the check off.
      ratio_floor: members smaller than this, inflated, are never ratio-checked (tiny text members
        compress far better than anything large and genuine).
    """

    member_bytes: int = 4 << 30
    total_bytes: int = 8 << 30
    max_ratio: float | None = 200.0
    ratio_floor: int = 4 << 20


def _check_member_name(name: str, where: str) -> None:
    shown = repr(name if len(name) <= 200 else name[:200] + "…")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise SceneFormatError(f"{where}: member {shown} has an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise SceneFormatError(f"{where}: member {shown} has a '..' path component")
    if "\x00" in name:
        raise SceneFormatError(f"{where}: member {shown} has a NUL byte in its name")


class Archive:
    """A validated, read-only view of a zip archive."""

    def __init__(
        self,
        path: str | os.PathLike,
        max_member_bytes: int = ArchiveLimits.member_bytes,
        *,
        max_total_bytes: int = ArchiveLimits.total_bytes,
        max_ratio: float | None = ArchiveLimits.max_ratio,
        ratio_floor_bytes: int = ArchiveLimits.ratio_floor,
    ):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.limits = limits = ArchiveLimits(
            int(max_member_bytes), int(max_total_bytes), max_ratio or 0.0, int(ratio_floor_bytes)
        )
        self.max_member_bytes = limits.member_bytes
        self.inflated = 0  # bytes produced by every read so far (the total budget's use)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"scene file not found: {self.path}")
        self._file_size = os.path.getsize(self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise SceneFormatError(f"{self.name}: not a zip archive, or truncated ({e})") from None
        except OSError as e:
            raise SceneFormatError(f"{self.name}: cannot be read ({e})") from None
        self._infos = {}
        for info in self._zip.infolist():
            _check_member_name(info.filename, self.name)
            if info.is_dir():
                continue
            self._infos[posixpath.normpath(info.filename)] = info
        self.members = tuple(self._infos)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def has(self, member: str) -> bool:
        return posixpath.normpath(member) in self._infos

    def _info(self, member: str) -> zipfile.ZipInfo:
        info = self._infos.get(posixpath.normpath(member))
        if info is None:
            raise SceneFormatError(f"{self.name}: member {member!r} is missing")
        return info

    def _check_header(self, info: zipfile.ZipInfo, member: str, limit: int) -> None:
        """Refuses what the header already admits to: over the member limit or the remaining total."""
        where = f"{self.name}:{member}"
        if info.file_size > limit:
            raise SceneFormatError(f"{where}: {info.file_size} bytes exceeds the limit of {limit} bytes")
        left = self.limits.total_bytes - self.inflated
        if info.file_size > left:
            raise SceneFormatError(
                f"{where}: {info.file_size} bytes exceeds what is left ({left} bytes) of the "
                f"archive's total limit of {self.limits.total_bytes} inflated bytes"
            )
        ratio, compressed = self._ratio_of(info)
        if self.limits.max_ratio and info.file_size > max(self.limits.ratio_floor, self.limits.max_ratio * compressed):
            raise SceneFormatError(
                f"{where}: inflates {ratio:.0f}:1 ({compressed} -> {info.file_size} bytes), over "
                f"the inflation ratio limit of {self.limits.max_ratio:.0f}:1 (a zip bomb?)"
            )

    def _ratio_of(self, info: zipfile.ZipInfo, produced: int | None = None) -> tuple[float, int]:
        # The compressed size bounds what zipfile reads for the member, and can be no larger than the file.
        compressed = max(1, min(info.compress_size, self._file_size))
        return (info.file_size if produced is None else produced) / compressed, compressed

    def _limit_error(self, info: zipfile.ZipInfo, member: str, produced: int, limit: int) -> str | None:
        """Why `produced` inflated bytes of the member are too many (None when they are fine)."""
        where = f"{self.name}:{member}"
        if produced > limit:
            return f"{where}: member inflates beyond the limit of {limit} bytes"
        if self.inflated + produced > self.limits.total_bytes:
            return f"{where}: inflating it passes the archive's total limit of {self.limits.total_bytes} inflated bytes"
        ratio, compressed = self._ratio_of(info, produced)
        if self.limits.max_ratio and produced > self.limits.ratio_floor and ratio > self.limits.max_ratio:
            return (
                f"{where}: inflates more than {self.limits.max_ratio:.0f}:1 ({compressed} compressed bytes gave "
                f"{produced} and counting), over the inflation ratio limit (a zip bomb?)"
            )
        return None

    def read(self, member: str, max_bytes: int | None = None) -> bytes:
        """Reads one member fully; refuses members over the limits, from the header and again from the bytes
        actually inflated."""
        limit = self.max_member_bytes if max_bytes is None else min(max_bytes, self.max_member_bytes)
        where = f"{self.name}:{member}"
        info = self._info(member)
        self._check_header(info, member, limit)
        out = io.BytesIO()
        produced = 0
        problem = chunk = None
        try:
            with self._zip.open(info) as f:
                while chunk := f.read(_CHUNK):
                    produced += len(chunk)
                    problem = self._limit_error(info, member, produced, limit)
                    if problem:
                        break
                    out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            problem = f"{where}: corrupt or truncated member ({e})"
        except NotImplementedError as e:
            problem = f"{where}: unsupported zip compression ({e})"
        if problem:
            out.close()  # free the partial member (and the last chunk) before raising
            del out
            chunk = b""
            self.inflated += produced
            raise SceneFormatError(problem)
        self.inflated += produced
        return out.getvalue()  # no copy: the buffer is handed over

    def open(self, member: str, max_bytes: int | None = None):
        """A seekable file object over one member, for members read in parts (a nested
        `checkpoint.ckpt` zip). Stored members are read in place; a compressed one is inflated into
        memory first (seeking in a deflate stream re-inflates it from the start), within the limits."""
        limit = self.max_member_bytes if max_bytes is None else min(max_bytes, self.max_member_bytes)
        info = self._info(member)
        self._check_header(info, member, limit)
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise SceneFormatError(
                    f"{self.name}:{member}: stored member claims {info.file_size} bytes but holds {info.compress_size}"
                )
            self.inflated += info.file_size
            return self._zip.open(info)
        return io.BytesIO(self.read(member, limit))

    def read_json(self, member: str, max_bytes: int) -> Any:
        """A JSON member, size-checked (while inflating) before it is parsed."""
        raw = self.read(member, max_bytes)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SceneFormatError(f"{self.name}:{member}: invalid JSON ({str(e)[:200]})") from None
        except RecursionError:
            raise SceneFormatError(f"{self.name}:{member}: JSON nests too deeply") from None

    def read_yaml(self, member: str, max_bytes: int) -> Any:
        """A YAML member (safe loader), size-checked (while inflating) before it is parsed."""
        import yaml

        raw = self.read(member, max_bytes)
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise SceneFormatError(f"{self.name}:{member}: invalid YAML ({str(e)[:200]})") from None
        except RecursionError:
            raise SceneFormatError(f"{self.name}:{member}: YAML nests too deeply") from None

    def usd_layers(self) -> list[str]:
        """USD layer members in archive order (the first is the root layer, per the USDZ spec)."""
        return [m for m in self.members if m.lower().endswith(USD_SUFFIXES)]

    def extract(self, members: list[str], directory: str) -> None:
        """Extracts `members` below `directory`, never outside it."""
        root = os.path.realpath(directory)
        for member in members:
            target = os.path.realpath(os.path.join(root, *member.split("/")))
            if os.path.commonpath([root, target]) != root:
                raise SceneFormatError(f"{self.name}: member {member!r} would extract outside the target")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(self.read(member))


def check_zip_members(zf: zipfile.ZipFile, limits: ArchiveLimits, where: str, container_bytes: int) -> None:
    """Header checks for a nested zip whose reader stops at each member's declared size (so headers do
    bound what it inflates): no member over `limits.member_bytes`, all together within
    `limits.total_bytes`, none inflating beyond `limits.max_ratio`."""
    total = 0
    for info in zf.infolist():
        name = info.filename if len(info.filename) <= 200 else info.filename[:200] + "…"
        if info.file_size > limits.member_bytes:
            raise SceneFormatError(
                f"{where}: member {name!r} holds {info.file_size} bytes, over the limit of {limits.member_bytes} bytes"
            )
        total += info.file_size
        if total > limits.total_bytes:
            raise SceneFormatError(
                f"{where}: members hold more than the total limit of {limits.total_bytes} inflated bytes"
            )
        compressed = max(1, min(info.compress_size, container_bytes))
        if limits.max_ratio and info.file_size > max(limits.ratio_floor, limits.max_ratio * compressed):
            raise SceneFormatError(
                f"{where}: member {name!r} inflates {info.file_size / compressed:.0f}:1, over "
                f"the inflation ratio limit of {limits.max_ratio:.0f}:1 (a zip bomb?)"
            )
