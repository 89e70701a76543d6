"""The scene cache: scenes resident on the accelerators, loaded lazily, at most `--cache-size` per device.

One device copy of a scene (an *instance*) serves every concurrent request (JAX arrays are immutable),
unlike NRE's one-backend-per-request model. A scene is loaded by the first request that needs it;
requests that arrive meanwhile wait for that load (up to their deadline: then UNAVAILABLE, "still
warming up").

Devices. Without `--devices` there is one implicit device (`None`: JAX's default device) and the cache
is one LRU of `capacity` scenes. With `--devices` every instance lives on one of the listed devices:

* a new scene goes to the least loaded device (fewest resident instances, then fewest requests using
  them, then the first listed); when every device is full, the least recently used idle instance (a
  second copy of a scene first) is evicted and the new scene takes its device;
* `max_instances` (`--max-backends-per-scene`): a request for a scene whose every instance is in use
  loads another instance on the least loaded device that has room and no copy of the scene, up to
  that many instances (never by evicting); requests go to the instance with the fewest users;
* when a device runs out of memory while loading, idle instances on that device only are evicted and
  the load is retried (up to `max_load_attempts` times).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from typing import Any, Callable, Sequence

from nurec_jax.scene import Scene
from nurec_jax.server.request_errors import ResourceExhausted, Unavailable, is_out_of_memory

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Slot:
    scene_id: str
    device: int  # index into SceneCache.devices
    ready: threading.Event
    scene: Scene | None = None
    error: BaseException | None = None
    users: int = 0


@dataclasses.dataclass(frozen=True)
class LoadedScene:
    """A resident scene: its id, the requests using it now and the devices of its instances."""

    scene_id: str
    users: int
    devices: tuple = (None,)

    @property
    def instances(self) -> int:
        return len(self.devices)


@dataclasses.dataclass(frozen=True)
class Instance:
    """One resident copy of a scene and the device it lives on (None: JAX's default device)."""

    scene: Scene
    device: Any


def device_name(device) -> str:
    """How reports name a device: "cuda:0", "cpu:1"; None (no --devices) names JAX's default device."""
    if device is None:
        import jax

        device = jax.devices()[0]
    return str(device)


def resolve_devices(spec: str | None) -> list | None:
    """The local JAX devices `--devices` names, in the order given; None when `spec` is None (the default
    device only). Raises ValueError naming --devices for an id no local device has."""
    if spec is None:
        return None
    import jax

    from nurec_jax.server.options import parse_devices

    ids = parse_devices(spec)
    local = jax.local_devices()
    if ids is None:
        return list(local)
    by_id = {d.id: d for d in local}
    for i in ids:
        if i not in by_id:
            raise ValueError(
                f"--devices: no local device has id {i} (local devices: {', '.join(f'{d.id} ({d})' for d in local)})"
            )
    return [by_id[i] for i in ids]


def load_on_device(load: Callable[[str], Scene], scene_id: str, device) -> Scene:
    """`load(scene_id)` with its arrays created on `device` (never staged on device 0) and committed there,
    so every computation on them runs on `device`."""
    import jax

    with jax.default_device(device):
        scene = load(scene_id)
    return dataclasses.replace(scene, gaussians=jax.device_put(scene.gaussians, device))


class SceneCache:
    """Resident scene instances, at most `capacity` per device. `loader` does the actual loading: called as
    `loader(scene_id)` without `devices`, as `loader(scene_id, device)` with them."""

    def __init__(
        self,
        loader: Callable[..., Scene],
        capacity: int = 10,
        max_load_attempts: int = 5,
        devices: Sequence | None = None,
        max_instances: int = 1,
    ):
        if capacity < 1:
            raise ValueError(f"--cache-size must be >= 1, got {capacity}")
        if max_instances < 1:
            raise ValueError(f"--max-backends-per-scene must be >= 1, got {max_instances}")
        if devices is not None and not devices:
            raise ValueError("--devices: no devices")
        self._loader = loader
        self._placed = devices is not None
        self.devices: list = [None] if devices is None else list(devices)
        self.capacity = capacity
        self.max_instances = max_instances
        self.max_load_attempts = max_load_attempts
        self._lock = threading.Lock()
        # Every instance, least recently used first; keyed (scene id, device index).
        self._slots: collections.OrderedDict[tuple[str, int], _Slot] = collections.OrderedDict()
        self.evictions = 0
        self.loads = 0
        self.on_drop: Callable[[str], None] | None = None  # called with each scene id evicted or dropped

    @property
    def total_capacity(self) -> int:
        """Instances the cache may hold on all devices together."""
        return self.capacity * len(self.devices)

    # ----------------------------------------------------------------------------------------
    # Reports

    def _ready_by_scene(self) -> dict[str, list[_Slot]]:
        out: dict[str, list[_Slot]] = {}
        with self._lock:
            for s in self._slots.values():
                if s.scene is not None:
                    out.setdefault(s.scene_id, []).append(s)
        return {sid: sorted(ss, key=lambda s: s.device) for sid, ss in out.items()}

    def loaded(self) -> list[LoadedScene]:
        """Every resident scene (least recently used first) with its instances' devices."""
        return [
            LoadedScene(sid, sum(s.users for s in ss), tuple(self.devices[s.device] for s in ss))
            for sid, ss in self._ready_by_scene().items()
        ]

    def resident(self) -> list[Scene]:
        """One resident instance of each scene (for reports; do not render from them without `use`)."""
        return [ss[0].scene for ss in self._ready_by_scene().values()]

    def placement(self) -> dict[str, list]:
        """Scene id -> the devices its resident instances live on."""
        return {sid: [self.devices[s.device] for s in ss] for sid, ss in self._ready_by_scene().items()}

    def is_loaded(self, scene_id: str) -> bool:
        return self.peek(scene_id) is not None

    def peek(self, scene_id: str) -> Scene | None:
        """A loaded instance of the scene, or None when none is (fully) loaded; never loads."""
        with self._lock:
            return next((s.scene for s in self._slots.values() if s.scene_id == scene_id and s.scene is not None), None)

    # ----------------------------------------------------------------------------------------
    # Eviction

    def drop(self, scene_id: str) -> None:
        """Forgets every instance of a scene (e.g. its file was unregistered); in-flight users keep their
        reference."""
        with self._lock:
            for key in [k for k in self._slots if k[0] == scene_id]:
                del self._slots[key]
        self._notify([scene_id])

    def _notify(self, scene_ids: list[str]) -> None:
        if self.on_drop is None:
            return
        for sid in scene_ids:
            try:
                self.on_drop(sid)
            except Exception:  # noqa: BLE001 - a report hook never stops loading or rendering
                _LOGGER.exception("model cache: on_drop(%r) failed", sid)

    def _remove_locked(self, slot: _Slot) -> None:
        del self._slots[(slot.scene_id, slot.device)]
        self.evictions += 1
        _LOGGER.info("evicted scene %r from %s", slot.scene_id, device_name(self.devices[slot.device]))

    def _lru_idle_locked(self) -> _Slot | None:
        """The least recently used idle instance, a second copy of a scene before a scene's only one."""
        idle = [s for s in self._slots.values() if not s.users and s.scene is not None]
        copies = collections.Counter(s.scene_id for s in self._slots.values())
        return next((s for s in idle if copies[s.scene_id] > 1), idle[0] if idle else None)

    def _evict_idle_on(self, device: int, keep: _Slot) -> int:
        """Evicts every idle instance on one device (the out-of-memory rule)."""
        with self._lock:
            victims = [
                s
                for s in self._slots.values()
                if s.device == device and s is not keep and not s.users and s.scene is not None
            ]
            for s in victims:
                self._remove_locked(s)
        self._notify([s.scene_id for s in victims])
        if victims:
            gc.collect()
        return len(victims)

    # ----------------------------------------------------------------------------------------
    # Placement

    def _least_loaded_locked(self, exclude: set[int]) -> int | None:
        """The device with room (below `capacity`) that holds the fewest instances, then serves the fewest
        users, then comes first; None when every device outside `exclude` is full."""
        count = [0] * len(self.devices)
        users = [0] * len(self.devices)
        for s in self._slots.values():
            count[s.device] += 1
            users[s.device] += s.users
        free = [d for d in range(len(self.devices)) if d not in exclude and count[d] < self.capacity]
        return min(free, key=lambda d: (count[d], users[d], d)) if free else None

    def _new_slot_locked(self, scene_id: str, device: int) -> _Slot:
        slot = _Slot(scene_id, device, threading.Event())
        self._slots[(scene_id, device)] = slot
        return slot

    def _claim(self, scene_id: str) -> tuple[_Slot, bool, list[str]]:
        """(instance, whether this caller loads it, scene ids evicted to make room), counted as a user."""
        evicted: list[str] = []
        with self._lock:
            mine = [s for s in self._slots.values() if s.scene_id == scene_id]
            slot, owner = None, False
            if mine:
                best = min(mine, key=lambda s: (s.users, s.scene is None, s.device))
                if best.users and len(mine) < self.max_instances:
                    device = self._least_loaded_locked({s.device for s in mine})
                    if device is not None:
                        slot, owner = self._new_slot_locked(scene_id, device), True
                        _LOGGER.info(
                            "scene %r is busy on %s: loading another instance on %s",
                            scene_id,
                            ", ".join(device_name(self.devices[s.device]) for s in mine),
                            device_name(self.devices[device]),
                        )
                if slot is None:
                    slot = best
            else:
                device = self._least_loaded_locked(set())
                if device is None:
                    victim = self._lru_idle_locked()
                    if victim is None:
                        n = len(self.devices)
                        where = f" on each of the {n} devices" if n > 1 else ""
                        raise ResourceExhausted(
                            f"model cache full: all {self.capacity} resident scenes{where} are "
                            f"in use (--cache-size); retry later"
                        )
                    self._remove_locked(victim)
                    evicted.append(victim.scene_id)
                    device = victim.device
                slot, owner = self._new_slot_locked(scene_id, device), True
            self._slots.move_to_end((scene_id, slot.device))
            slot.users += 1
        return slot, owner, evicted

    # ----------------------------------------------------------------------------------------
    # Use

    @contextlib.contextmanager
    def use(self, scene_id: str, timeout: float | None = None):
        """Context manager yielding a loaded Scene instance; it is not evicted while in use."""
        with self.use_instance(scene_id, timeout) as instance:
            yield instance.scene

    @contextlib.contextmanager
    def use_instance(self, scene_id: str, timeout: float | None = None):
        """Like `use`, yielding an `Instance` (the scene and its device)."""
        slot, owner, evicted = self._claim(scene_id)
        try:
            if evicted:
                self._notify(evicted)
                gc.collect()
            if owner:
                self._load(slot)
            elif not slot.ready.wait(timeout):
                raise Unavailable(f"scene {scene_id!r} is still loading (warming up); retry")
            if slot.error is not None:
                raise slot.error
            yield Instance(slot.scene, self.devices[slot.device])
        finally:
            with self._lock:
                slot.users -= 1

    def _load(self, slot: _Slot) -> None:
        start = time.perf_counter()
        scene_id, device = slot.scene_id, self.devices[slot.device]
        try:
            for attempt in range(1, self.max_load_attempts + 1):
                try:
                    slot.scene = self._loader(scene_id, device) if self._placed else self._loader(scene_id)
                    break
                except Exception as e:  # noqa: BLE001
                    if not is_out_of_memory(e):
                        raise
                    evicted = self._evict_idle_on(slot.device, keep=slot)
                    _LOGGER.warning(
                        "out of memory loading %r on %s (attempt %d): evicted %d idle scenes there",
                        scene_id,
                        device_name(device),
                        attempt,
                        evicted,
                    )
                    if attempt == self.max_load_attempts:
                        raise ResourceExhausted(
                            f"out of device memory loading scene {scene_id!r} after {attempt} attempts "
                            f"(evicting idle scenes did not help): {e}"
                        ) from None
            self.loads += 1
            _LOGGER.info(
                "loaded scene %r%s in %.1f s",
                scene_id,
                f" on {device_name(device)}" if self._placed else "",
                time.perf_counter() - start,
            )
        except BaseException as e:
            slot.error = e
            with self._lock:  # a failed load is not cached: the next request tries again
                key = (scene_id, slot.device)
                if self._slots.get(key) is slot:
                    del self._slots[key]
            raise
        finally:
            slot.ready.set()
