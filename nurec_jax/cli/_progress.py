"""What render-grpc says while it renders.

On a terminal: a tqdm bar whose right side names the camera and frame in flight, with messages
("compiling ...") printed above it through `tqdm.write`, so they never land inside the bar; log
records of any library go the same way while the bar is up (`logging_redirect_tqdm`). Elsewhere
(a pipe, a log file, `--no-progress`): one plain line per finished frame.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Self, TextIO


class Progress:
    """Progress of `total` frames. Thread-safe: render threads call `started` and `finished`."""

    def __init__(self, total: int, *, bar: bool | None = True, file: TextIO | None = None, desc: str = "render-grpc"):
        """Args:
        total: frames to render.
        bar: True: a tqdm bar when `file` is a terminal; False: plain lines.
        file: where it all goes (stderr by default).
        desc: the bar's label.
        """
        self._file = file if file is not None else sys.stderr
        self._total = total
        self._done = 0
        self._in_flight: list[str] = []
        self._lock = threading.Lock()
        self._bar = None
        if bar and hasattr(self._file, "isatty") and self._file.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="frame", desc=desc, file=self._file, dynamic_ncols=True)
        self._logging = contextlib.ExitStack()

    @property
    def has_bar(self) -> bool:
        return self._bar is not None

    def __enter__(self) -> Self:
        if self._bar is not None:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._logging.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def say(self, message: str) -> None:
        """A line for the user, above the bar when there is one."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(message, file=self._file)
            else:
                print(message, file=self._file, flush=True)

    def _show_in_flight(self) -> None:
        if self._bar is not None:
            more = len(self._in_flight) - 1
            self._bar.set_postfix_str(
                (self._in_flight[0] + (f" (+{more} more)" if more > 0 else "")) if self._in_flight else "", refresh=True
            )

    def started(self, label: str) -> None:
        """`label` (camera and frame) is being rendered now; the bar shows the oldest in flight."""
        with self._lock:
            self._in_flight.append(label)
            self._show_in_flight()

    def finished(self, label: str, seconds: float, ok: bool = True) -> None:
        """`label` is done (or failed), after `seconds`."""
        with self._lock:
            self._done += 1
            if label in self._in_flight:
                self._in_flight.remove(label)
            if self._bar is not None:
                self._show_in_flight()
                self._bar.update(1)
            else:
                state = f"{seconds:.1f} s" if ok else "failed"
                print(f"[{self._done}/{self._total}] {label} ({state})", file=self._file, flush=True)

    def close(self) -> None:
        self._logging.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
