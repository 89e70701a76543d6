"""Safe reading of `.usdz` (zip) archives.

Every member name is validated (no absolute paths, no `..`), sizes are checked against a limit
before and while reading (zip bombs), and USD layers are only ever extracted below a temporary
directory that this module creates.
"""

from __future__ import annotations

import io
import os
import posixpath
import zipfile
import zlib

from nurec_jax.errors import SceneFormatError

USD_SUFFIXES = (".usda", ".usdc", ".usd")


def _check_member_name(name: str, where: str) -> None:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise SceneFormatError(f"{where}: member {name!r} has an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise SceneFormatError(f"{where}: member {name!r} has a '..' path component")
    if "\x00" in name:
        raise SceneFormatError(f"{where}: member {name!r} has a NUL byte in its name")


class Archive:
    """A validated, read-only view of a zip archive."""

    def __init__(self, path: str | os.PathLike, max_member_bytes: int):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.max_member_bytes = int(max_member_bytes)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"scene file not found: {self.path}")
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

    def read(self, member: str, max_bytes: int | None = None) -> bytes:
        """Reads one member fully; refuses members larger than the limit."""
        limit = self.max_member_bytes if max_bytes is None else max_bytes
        where = f"{self.name}:{member}"
        info = self._infos.get(posixpath.normpath(member))
        if info is None:
            raise SceneFormatError(f"{self.name}: member {member!r} is missing")
        if info.file_size > limit:
            raise SceneFormatError(f"{where}: {info.file_size} bytes exceeds the limit of {limit} bytes")
        out = bytearray()
        try:
            with self._zip.open(info) as f:
                while chunk := f.read(1 << 20):
                    out += chunk
                    if len(out) > limit:
                        raise SceneFormatError(f"{where}: member inflates beyond the limit of {limit} bytes")
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise SceneFormatError(f"{where}: corrupt or truncated member ({e})") from None
        except NotImplementedError as e:
            raise SceneFormatError(f"{where}: unsupported zip compression ({e})") from None
        return bytes(out)

    def open(self, member: str, max_bytes: int | None = None):
        """A seekable file object over one member, for members read in parts (a nested
        `checkpoint.ckpt` zip). Stored members are read in place; a compressed one is inflated into
        memory first (seeking in a deflate stream re-inflates it from the start), within the limit."""
        limit = self.max_member_bytes if max_bytes is None else max_bytes
        info = self._infos.get(posixpath.normpath(member))
        if info is None:
            raise SceneFormatError(f"{self.name}: member {member!r} is missing")
        if info.file_size > limit:
            raise SceneFormatError(f"{self.name}:{member}: {info.file_size} bytes exceeds the limit of {limit} bytes")
        if info.compress_type == zipfile.ZIP_STORED:
            return self._zip.open(info)
        return io.BytesIO(self.read(member, limit))

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
