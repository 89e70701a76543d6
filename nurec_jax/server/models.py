"""The model cache: scenes resident on the device, loaded lazily, kept in an LRU of `--cache-size`.

One device copy of a scene serves every concurrent request (JAX arrays are immutable), unlike NRE's
one-backend-per-request model. A scene is loaded by the first request that needs it; requests that
arrive meanwhile wait for that load (up to their deadline: then UNAVAILABLE, "still warming up").
When the device runs out of memory while loading, idle cached scenes are evicted and the load is
retried (up to `max_load_attempts` times).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from typing import Callable

from nurec_jax.scene import Scene
from nurec_jax.server.errors import ResourceExhausted, Unavailable, is_out_of_memory

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass
class _Slot:
    ready: threading.Event
    scene: Scene | None = None
    error: BaseException | None = None
    users: int = 0
    loads: int = 0


@dataclasses.dataclass(frozen=True)
class LoadedScene:
    scene_id: str
    users: int


class ModelCache:
    """LRU of loaded scenes. `loader(scene_id) -> Scene` does the actual loading."""

    def __init__(self, loader: Callable[[str], Scene], capacity: int = 10, max_load_attempts: int = 5):
        if capacity < 1:
            raise ValueError(f"--cache-size must be >= 1, got {capacity}")
        self._loader = loader
        self.capacity = capacity
        self.max_load_attempts = max_load_attempts
        self._lock = threading.Lock()
        self._slots: collections.OrderedDict[str, _Slot] = collections.OrderedDict()
        self.evictions = 0
        self.loads = 0
        self.on_drop: Callable[[str], None] | None = None  # called with each scene id evicted or dropped

    def loaded(self) -> list[LoadedScene]:
        with self._lock:
            return [LoadedScene(sid, s.users) for sid, s in self._slots.items() if s.scene is not None]

    def resident(self) -> list[Scene]:
        """The resident scenes themselves (for reports; do not render from them without `use`)."""
        with self._lock:
            return [s.scene for s in self._slots.values() if s.scene is not None]

    def is_loaded(self, scene_id: str) -> bool:
        with self._lock:
            s = self._slots.get(scene_id)
            return s is not None and s.scene is not None

    def peek(self, scene_id: str) -> Scene | None:
        """The loaded scene, or None when it is not (fully) loaded; never loads."""
        with self._lock:
            s = self._slots.get(scene_id)
            return None if s is None else s.scene

    def drop(self, scene_id: str) -> None:
        """Forgets a scene (e.g. its file was unregistered); in-flight users keep their reference."""
        with self._lock:
            self._slots.pop(scene_id, None)
        if self.on_drop is not None:
            self.on_drop(scene_id)

    def _evict_idle(self, keep: str, need_room: bool) -> int:
        """Evicts least-recently-used idle scenes; with need_room only until there is room for one more."""
        evicted = []
        with self._lock:
            for sid in list(self._slots):
                if need_room and len(self._slots) <= self.capacity:
                    break
                s = self._slots[sid]
                if sid == keep or s.users or s.scene is None:
                    continue
                del self._slots[sid]
                evicted.append(sid)
        n = len(evicted)
        if self.on_drop is not None:
            for sid in evicted:
                self.on_drop(sid)
        if n:
            self.evictions += n
            gc.collect()
        return n

    @contextlib.contextmanager
    def use(self, scene_id: str, timeout: float | None = None):
        """Context manager yielding the loaded Scene; it is not evicted while in use."""
        slot, owner = self._claim(scene_id)
        try:
            if owner:
                self._load(scene_id, slot)
            elif not slot.ready.wait(timeout):
                raise Unavailable(f"scene {scene_id!r} is still loading (warming up); retry")
            if slot.error is not None:
                raise slot.error
            yield slot.scene
        finally:
            with self._lock:
                slot.users -= 1

    def _claim(self, scene_id: str) -> tuple[_Slot, bool]:
        with self._lock:
            slot = self._slots.get(scene_id)
            owner = slot is None
            if owner:
                slot = _Slot(threading.Event())
                self._slots[scene_id] = slot
            self._slots.move_to_end(scene_id)
            slot.users += 1
        if owner and len(self._slots) > self.capacity:
            self._evict_idle(scene_id, need_room=True)
            with self._lock:
                full = len(self._slots) > self.capacity
                if full:
                    del self._slots[scene_id]
                    slot.users -= 1
            if full:
                raise ResourceExhausted(
                    f"model cache full: all {self.capacity} resident scenes are in use (--cache-size); retry later")
        return slot, owner

    def _load(self, scene_id: str, slot: _Slot) -> None:
        start = time.perf_counter()
        try:
            for attempt in range(1, self.max_load_attempts + 1):
                try:
                    slot.scene = self._loader(scene_id)
                    break
                except Exception as e:  # noqa: BLE001
                    if not is_out_of_memory(e):
                        raise
                    evicted = self._evict_idle(scene_id, need_room=False)
                    _LOGGER.warning("out of memory loading %r (attempt %d): evicted %d idle scenes", scene_id,
                                    attempt, evicted)
                    if attempt == self.max_load_attempts:
                        raise ResourceExhausted(
                            f"out of device memory loading scene {scene_id!r} after {attempt} attempts "
                            f"(evicting idle scenes did not help): {e}") from None
            self.loads += 1
            _LOGGER.info("loaded scene %r in %.1f s", scene_id, time.perf_counter() - start)
        except BaseException as e:
            slot.error = e
            with self._lock:  # a failed load is not cached: the next request tries again
                if self._slots.get(scene_id) is slot:
                    del self._slots[scene_id]
            raise
        finally:
            slot.ready.set()
