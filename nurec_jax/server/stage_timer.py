"""Per-request stage timing (NRE's `--enable-timing`, `--timing-synchronize`).

`StageTimer`, one per request: `with timer.stage("compositing") as st: out = st.wait(f())` records the
stage's wall milliseconds. `st.wait` blocks on device results only when synchronizing (JAX dispatch is
asynchronous, so without it a device stage measures dispatch, and the wait lands in a later stage). A
timer given a `Profiler` opens one profiler range per stage.
"""

from __future__ import annotations

import threading
import time
from typing import TypeVar

from nurec_jax.server.profiler import Profiler

_T = TypeVar("_T")


class _NullStage:
    """The stage of a disabled timer: enters, exits and waits for nothing."""

    __slots__ = ()

    def __enter__(self) -> _NullStage:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def wait(self, value: _T) -> _T:
        return value


_NULL_STAGE = _NullStage()


class _Stage:
    """One open stage of an enabled timer (or of a profiler-only timer, when `timer` is None)."""

    __slots__ = ("_timer", "_name", "_range", "_t0")

    def __init__(self, timer: StageTimer | None, name: str, prange):
        self._timer = timer
        self._name = name
        self._range = prange

    def __enter__(self) -> _Stage:
        if self._timer is not None:
            self._timer._ms.setdefault(self._name, 0.0)  # entry order: `render` before its sub-stages
        if self._range is not None:
            self._range.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        t1 = time.perf_counter()
        if self._timer is not None:
            self._timer._add(self._name, self._t0, t1)
        if self._range is not None:
            self._range.__exit__(*exc)

    def wait(self, value: _T) -> _T:
        """Returns `value`; with `synchronize=True` first blocks until its device arrays are ready, so
        the stage's clock includes the device work (a pytree of arrays is fine)."""
        if self._timer is not None and self._timer.synchronize:
            import jax  # only a synchronizing timer needs it

            jax.block_until_ready(value)
        return value


class StageTimer:
    """Wall-clock milliseconds of a request's stages, in first-entry order.

    Args:
        enabled: False makes `stage()` return a shared no-op (a disabled timer records nothing), unless
            a profiler is given, in which case stages still open profiler ranges.
        synchronize: `--timing-synchronize`: `Stage.wait(x)` blocks on `x` (else it only returns it).
        profiler: open `profiler.range(name)` around each stage (ignored when None or backend NONE).

    A name entered twice (e.g. one `compositing` per camera) adds up; it keeps its first position.
    """

    def __init__(self, enabled: bool = True, synchronize: bool = False, profiler: Profiler | None = None):
        self.enabled = enabled
        self.synchronize = synchronize and enabled
        self._profiler = profiler if profiler is not None and profiler.enabled else None
        self._ms: dict[str, float] = {}
        self._first: float | None = None
        self._last: float | None = None
        self._lock = threading.Lock()  # a batch encodes one image on a host thread while the next renders

    def stage(self, name: str):
        """Context manager timing stage `name`; `as st` gives `st.wait(value) -> value`."""
        if self._profiler is None:
            return _Stage(self, name, None) if self.enabled else _NULL_STAGE
        return _Stage(self if self.enabled else None, name, self._profiler.range(name))

    def _add(self, name: str, t0: float, t1: float) -> None:
        with self._lock:
            self._ms[name] = self._ms.get(name, 0.0) + (t1 - t0) * 1e3
            if self._first is None or t0 < self._first:
                self._first = t0
            if self._last is None or t1 > self._last:
                self._last = t1

    def record(self) -> dict[str, float]:
        """{stage name: ms} in first-entry order (a copy; empty for a disabled timer)."""
        return dict(self._ms)

    def total_ms(self) -> float:
        """Wall ms from the start of the first stage to the end of the last one (nested stages such as
        `projection` inside `render` are not double counted; gaps between stages are included)."""
        if self._first is None:
            return 0.0
        return (self._last - self._first) * 1e3
