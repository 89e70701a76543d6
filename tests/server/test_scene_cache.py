"""The model cache: LRU of loaded scenes, waiting loads, OOM eviction and retry."""

import threading

import pytest

from nurec_jax.server.request_errors import ResourceExhausted, Unavailable
from nurec_jax.server.scene_cache import SceneCache


class FakeLoader:
    def __init__(self, oom_times=0, gate=None):
        self.calls = []
        self.oom_times = oom_times
        self.gate = gate

    def __call__(self, scene_id):
        self.calls.append(scene_id)
        if self.gate is not None:
            self.gate.wait(10)
        if self.oom_times:
            self.oom_times -= 1
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
        return f"scene:{scene_id}"


def test_lru_and_reuse():
    loader = FakeLoader()
    cache = SceneCache(loader, capacity=2)
    for sid in ("a", "b", "a", "c"):
        with cache.use(sid) as scene:
            assert scene == f"scene:{sid}"
    assert loader.calls == ["a", "b", "c"]  # 'a' reused, 'b' evicted as least recently used
    assert [s.scene_id for s in cache.loaded()] == ["a", "c"]
    assert cache.evictions == 1


def test_busy_scenes_are_not_evicted():
    cache = SceneCache(FakeLoader(), capacity=1)
    with cache.use("a"):
        with pytest.raises(ResourceExhausted, match="--cache-size"):
            with cache.use("b"):
                pass
    with cache.use("b"):
        pass
    assert [s.scene_id for s in cache.loaded()] == ["b"]


def test_oom_evicts_and_retries():
    loader = FakeLoader()
    cache = SceneCache(loader, capacity=3)
    with cache.use("a"), cache.use("b"):
        pass
    loader.oom_times = 1
    with cache.use("c") as scene:
        assert scene == "scene:c"
    assert loader.calls == ["a", "b", "c", "c"]
    assert [s.scene_id for s in cache.loaded()] == ["c"]
    loader.oom_times = 10
    with pytest.raises(ResourceExhausted, match="after 5 attempts"):
        with cache.use("d"):
            pass
    assert not cache.is_loaded("d")


def test_waiters_get_unavailable_then_the_scene():
    gate = threading.Event()
    loader = FakeLoader(gate=gate)
    cache = SceneCache(loader, capacity=2)
    got = []
    owner = threading.Thread(target=lambda: got.append(cache.use("a").__enter__()))
    owner.start()
    while not loader.calls:
        pass
    with pytest.raises(Unavailable, match="still loading"):
        with cache.use("a", timeout=0.05):
            pass
    gate.set()
    owner.join(10)
    with cache.use("a", timeout=1) as scene:
        assert scene == "scene:a"
    assert loader.calls == ["a"]


def test_failed_load_is_not_cached():
    class Boom(FakeLoader):
        def __call__(self, scene_id):
            self.calls.append(scene_id)
            raise ValueError("bad payload")

    loader = Boom()
    cache = SceneCache(loader, capacity=2)
    for _ in range(2):
        with pytest.raises(ValueError, match="bad payload"):
            with cache.use("a"):
                pass
    assert loader.calls == ["a", "a"]
