"""One-line exits for scene-file errors in the command-line tools (no traceback)."""

from __future__ import annotations

import functools
import os
import sys

from nurec_jax.errors import SceneFormatError


def one_line_scene_errors(main, prog: str | None = None):
    """Wraps an absl `main(argv)` so a malformed or missing scene file ends the program with one line on
    stderr naming what is wrong (exit status 1) instead of a traceback; `prog` starts the line (default:
    the program's file name)."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except (SceneFormatError, OSError) as e:  # OSError: missing, unreadable, a directory, ...
            sys.exit(f"{prog or os.path.basename(sys.argv[0])}: {e}")

    return wrapped
