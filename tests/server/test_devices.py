"""Several accelerators in one process (`--devices`): placement, per-device LRU and out-of-memory eviction,
`--max-backends-per-scene`, refused device lists, and (in a subprocess with 4 CPU devices) the served
pixels, the placement reports and concurrent device sections."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from nurec_jax.server.options import ServerOptions, parse_devices
from nurec_jax.server.request_errors import ResourceExhausted
from nurec_jax.server.scene_cache import SceneCache, resolve_devices

pytestmark = pytest.mark.xdist_group("devices")  # one worker runs the subprocess scenario, once

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
DEVICES = ("d0", "d1", "d2", "d3")


class PlacingLoader:
    """loader(scene_id, device) without JAX; `oom_on` makes loads on that device run out of memory."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.oom_on: dict[str, int] = {}

    def __call__(self, scene_id, device):
        self.calls.append((scene_id, device))
        if self.oom_on.get(device):
            self.oom_on[device] -= 1
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
        return f"{scene_id}@{device}"


def _placement(cache):
    return {sid: list(devices) for sid, devices in cache.placement().items()}


def test_new_scenes_go_to_the_least_loaded_device():
    cache = SceneCache(PlacingLoader(), capacity=2, devices=DEVICES[:3])
    for sid in ("a", "b", "c", "d"):
        with cache.use_instance(sid) as inst:
            assert inst.scene == f"{sid}@{inst.device}"
    assert _placement(cache) == {"a": ["d0"], "b": ["d1"], "c": ["d2"], "d": ["d0"]}
    # A device serving requests counts as more loaded than an idle one with as many scenes.
    with cache.use("b"), cache.use_instance("e") as inst:
        assert inst.device == "d2"


def test_lru_and_capacity_are_per_device():
    loader = PlacingLoader()
    cache = SceneCache(loader, capacity=1, devices=DEVICES[:2])
    for sid in ("a", "b", "a", "c"):
        with cache.use(sid):
            pass
    # Both devices full: c evicts the least recently used idle scene (b, on d1) and takes its device.
    assert _placement(cache) == {"a": ["d0"], "c": ["d1"]}
    assert cache.evictions == 1 and cache.total_capacity == 2
    with cache.use("a"), cache.use("c"):
        with pytest.raises(ResourceExhausted, match=r"all 1 resident scenes on each of the 2 devices .*--cache-size"):
            with cache.use("d"):
                pass


def test_out_of_memory_evicts_only_on_the_loading_device():
    loader = PlacingLoader()
    cache = SceneCache(loader, capacity=3, devices=DEVICES[:2])
    for sid in ("a", "b", "c"):  # a, c on d0; b on d1
        with cache.use(sid):
            pass
    loader.oom_on["d1"] = 1
    with cache.use_instance("d") as inst:  # d1 holds fewer scenes: d goes there, runs out of memory once
        assert inst.device == "d1"
    assert _placement(cache) == {"a": ["d0"], "c": ["d0"], "d": ["d1"]}  # only b (d1's idle scene) was evicted
    assert loader.calls[-2:] == [("d", "d1"), ("d", "d1")]


def test_a_busy_scene_gets_more_instances_up_to_max_backends():
    loader = PlacingLoader()
    cache = SceneCache(loader, capacity=2, devices=DEVICES[:3], max_instances=2)
    with cache.use("b"):
        pass  # b on d0
    with cache.use_instance("a") as first:  # d1: fewer scenes than d0
        with cache.use_instance("a") as second:  # a is in use: a second instance on the least loaded other device
            with cache.use_instance("a") as third:  # max reached: the instance with the fewest users (a tie: d1)
                with cache.use_instance("a") as fourth:  # d1 has two users now, d2 one
                    assert [i.device for i in (first, second, third, fourth)] == ["d1", "d2", "d1", "d2"]
            assert [(s.scene_id, s.instances, s.users) for s in cache.loaded()] == [("b", 1, 0), ("a", 2, 2)]
    assert loader.calls == [("b", "d0"), ("a", "d1"), ("a", "d2")]
    with cache.use_instance("a") as again:  # idle instances are shared, not copied
        assert again.device == "d1"
    # A new scene needing room evicts a second copy before any scene's only instance.
    cache2 = SceneCache(PlacingLoader(), capacity=1, devices=DEVICES[:2], max_instances=2)
    with cache2.use("a"), cache2.use("a"):
        pass  # a on d0 and d1
    with cache2.use_instance("b") as inst:
        assert inst.device == "d0"  # a's older copy (d0) gave way
    assert _placement(cache2) == {"a": ["d1"], "b": ["d0"]}


def test_without_max_backends_a_busy_scene_is_shared():
    loader = PlacingLoader()
    cache = SceneCache(loader, capacity=2, devices=DEVICES[:2])
    with cache.use("a"), cache.use("a"):
        pass
    assert loader.calls == [("a", "d0")]
    cache.drop("a")
    assert cache.placement() == {} and not cache.is_loaded("a")


def test_device_lists_are_checked():
    assert parse_devices("all") is None and parse_devices(" 0, 2 ") == (0, 2)
    for bad, message in (
        ("", "--devices must be"),
        ("gpu0", "--devices must be"),
        ("0,,1", "--devices must be"),
        ("-1", "--devices must be"),
        ("1,1", "--devices names device 1 more than once"),
    ):
        with pytest.raises(ValueError, match=message):
            ServerOptions(devices=bad).validate()
    with pytest.raises(ValueError, match="--max-backends-per-scene must be >= 1"):
        ServerOptions(max_backends_per_scene=0).validate()
    assert resolve_devices(None) is None
    assert resolve_devices("all") == jax.local_devices()
    assert resolve_devices("0") == [jax.local_devices()[0]]
    with pytest.raises(ValueError, match=r"--devices: no local device has id 7 \(local devices: 0 "):
        resolve_devices("7")


def test_serve_grpc_refuses_a_device_it_does_not_have(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nurec_jax.cli.serve_grpc",
            "--devices=0,7",
            "--port=0",
            "--compilation_cache_dir=",
            f"--download_cache_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("serve-grpc:")]
    assert len(errors) == 1 and "--devices: no local device has id 7" in errors[0], proc.stderr[-2000:]


@pytest.fixture(scope="session")
def scenario(tmp_path_factory):
    """tests/server/devices_scenario.py's JSON, run on 4 forced CPU devices. Session scope: run once even
    when the worker interleaves other modules' tests between this module's (a module fixture would rerun)."""
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    proc = subprocess.run(
        [sys.executable, os.path.join(_HERE, "devices_scenario.py"), str(tmp_path_factory.mktemp("devices"))],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_scene_on_its_own_device_renders_the_single_device_pixels(scenario):
    assert scenario["jax_devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert scenario["placement"] == {
        "placement.devices": "cpu:0,cpu:1,cpu:2,cpu:3",
        "placement.scene.thin-a": "cpu:0",
        "placement.scene.thin-b": "cpu:1",
    }
    assert scenario["loaded"] == {"thin-a": 1, "thin-b": 1} and scenario["capacity"] == 40  # 10 per device
    # The render ran where its scene lives: nothing was computed on (or copied to) device 0.
    assert scenario["output_devices"] == {"scene": "cpu:1", "rgb": ["cpu:1"], "num_pairs": ["cpu:1"]}
    # Bitwise the pixels of the same requests to a server without --devices.
    assert scenario["same_pixels"] == {"thin-a": True, "thin-b": True}, scenario["max_abs_diff"]
    assert scenario["single_placement"] == {
        "placement.devices": "cpu:0",
        "placement.scene.thin-a": "cpu:0",
        "placement.scene.thin-b": "cpu:0",
    }


def test_scenes_on_different_devices_render_at_the_same_time(scenario):
    # Each device section waited inside until the other request had entered its own: with two devices
    # both got in (the sections overlap); with one device the second waited for the lock, the wait timed
    # out and the sections followed one another.
    multi, single = scenario["multi_concurrent"], scenario["single_concurrent"]
    assert sorted(s[0] for s in multi["sections"]) == ["cpu:0", "cpu:1"]
    assert multi["overlap"] and not multi["barrier_broken"], multi
    assert scenario["multi_concurrent_same_pixels"]
    assert [s[0] for s in single["sections"]] == ["cpu:0", "cpu:0"]
    assert not single["overlap"] and single["barrier_broken"], single


def test_max_backends_per_scene_loads_a_second_instance(scenario):
    assert scenario["placement_after"] == {"placement.scene.thin-a": "cpu:0,cpu:2", "placement.scene.thin-b": "cpu:1"}
    assert scenario["loaded_after"] == {"thin-a": 2, "thin-b": 1}
    assert scenario["second_instance_same_pixels"]
