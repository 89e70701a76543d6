"""One-line exits for scene-file errors in the command-line tools (no traceback)."""

from __future__ import annotations

import functools
import os
import sys

from nurec_jax.errors import SceneFormatError


def one_line_scene_errors(main):
    """Wraps an absl `main(argv)` so a malformed or missing scene file ends the program with one line on
    stderr naming what is wrong (exit status 1) instead of a traceback."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except (SceneFormatError, FileNotFoundError) as e:
            sys.exit(f"{os.path.basename(sys.argv[0])}: {e}")

    return wrapped
