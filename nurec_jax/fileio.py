"""Atomic file replacement: write a hidden temporary file beside the target, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", encoding: str | None = None):
    """Yields a temporary file in `path`'s directory (created if needed); when the block ends normally it
    replaces `path` (a rename, never a copy), otherwise it is removed, so a failed or interrupted write
    never leaves a file that looks complete. `mode` "w+b" lets the block read back what it wrote."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
