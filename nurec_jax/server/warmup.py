"""Start-up compile warm-up: renders each camera of each scene once, so first requests hit compiled
functions (and found capacity buckets) instead of compiling.

Runs in the background after the scenes have loaded (health is already SERVING; metadata and health
RPCs never wait for it); each render takes the lock of its scene's device like a request does, so a
request that arrives meanwhile waits at most one warm-up frame. With `--devices`, each scene compiles on
the device it was placed on (executables are per device). With the persistent compilation cache on, a
restarted server's warm-up loads executables from the cache instead of compiling.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Mapping

import numpy as np

from nurec_jax import cameras
from nurec_jax.metadata import SceneMetadata
from nurec_jax.poses import PosePair
from nurec_jax.renderer import rig_camera_poses, track_actor_poses

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass
class WarmupStatus:
    """Progress of the compile warm-up (reported by get_server_config as `warmup.*`)."""

    state: str = "off"  # off | running | done | stopped | failed
    planned: int = 0
    rendered: int = 0
    seconds: float = 0.0
    error: str = ""

    def as_strings(self) -> dict[str, str]:
        return {
            "warmup.state": self.state,
            "warmup.rendered": f"{self.rendered}/{self.planned}",
            "warmup.seconds": f"{self.seconds:.1f}",
            **({"warmup.error": self.error} if self.error else {}),
        }


def camera_jobs(meta: SceneMetadata, height: int = 0):
    """(camera id, camera at `height` (0: native), sensor poses, exposure (start, end) us) for every camera
    calibration (a logical id held by several trajectories comes once per trajectory)."""
    for cal in sorted(meta.camera_list, key=lambda c: (c.logical_id, c.trajectory_idx)):
        cam_id = cal.logical_id
        cam = cameras.camera_at_resolution(cameras.camera_from_intrinsics(cal.intrinsics), 0, height)
        stamps = np.asarray(cal.frame_timestamps_us).reshape(-1, 2)
        if meta.trajectory_of(cal) is not None and len(stamps):
            s_us, e_us = (int(t) for t in stamps[len(stamps) // 2])
            pose = rig_camera_poses(meta, cam_id, s_us, e_us, trajectory_idx=cal.trajectory_idx)
        else:  # any pose compiles the same function
            s_us = e_us = 0
            pose = PosePair.from_matrices(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32))
        yield cam_id, cam, pose, (s_us, e_us)


def warm_up(
    scene_ids,
    registry,
    scene_cache,
    renderer,
    device_locks: Mapping[object, threading.Lock],
    stop: threading.Event,
    status: WarmupStatus,
    height: int = 0,
) -> None:
    """Renders every camera of every scene once at output `height` (0: native; see the module docstring).
    `device_locks` maps each device of `scene_cache` to its lock (the servicer's)."""
    t0 = time.perf_counter()
    plan = [(sid, registry.metadata(sid)) for sid in scene_ids]
    status.planned = sum(len(meta.camera_list) for _, meta in plan)
    status.state = "running"
    try:
        for sid, meta in plan:
            with scene_cache.use_instance(sid) as instance:
                scene, device_lock = instance.scene, device_locks[instance.device]
                for cam_id, cam, pose, (s_us, e_us) in camera_jobs(meta, height):
                    if stop.is_set():
                        status.state = "stopped"
                        return
                    actors = track_actor_poses(meta, scene.gaussians.track_ids, s_us, e_us)
                    c0 = time.perf_counter()
                    with device_lock:
                        renderer.render(scene.gaussians, cam, pose, actors, cache_key=(sid,)).rgb.block_until_ready()
                    status.rendered += 1
                    status.seconds = time.perf_counter() - t0
                    _LOGGER.info(
                        "warm-up: %s/%s %dx%d in %.1f s", sid, cam_id, cam.width, cam.height, time.perf_counter() - c0
                    )
        status.state = "done"
    except Exception as e:  # noqa: BLE001 - a failed warm-up leaves the server serving (requests compile)
        status.state, status.error = "failed", f"{type(e).__name__}: {e}"
        _LOGGER.error("warm-up failed: %s", status.error)
    finally:
        status.seconds = time.perf_counter() - t0
