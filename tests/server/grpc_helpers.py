"""Shared pieces of the real-server tests."""

from __future__ import annotations

import io
import threading

import grpc
import numpy as np
from PIL import Image

from nurec_jax import read_scene_metadata
from nurec_jax._proto import sensorsim_pb2, sensorsim_pb2_grpc
from nurec_jax.server import convert

CAM = "camera_front_wide_120fov"
HEIGHT = 36  # 64x36 for the 1920x1080 cameras: one compile per camera model in the whole module


def rpc_error(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    """Calls an RPC that must fail; returns its (status code, details)."""
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError(f"{getattr(fn, '_method', fn)!r} succeeded; an error was expected")


def connect(port: int):
    limit = 64 << 20  # what AlpaSim uses; a lidar spin with every field filled exceeds gRPC's default 4 MiB
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    return channel, sensorsim_pb2_grpc.SensorsimServiceStub(channel)


def rgb_request(
    scene_path: str,
    scene_id: str,
    frame: int = 10,
    camera: str = CAM,
    height: int = HEIGHT,
    fmt=sensorsim_pb2.PNG,
    spec=None,
) -> sensorsim_pb2.RGBRenderRequest:
    meta = read_scene_metadata(scene_path)
    cal = meta.cameras[camera]
    s, e = (int(t) for t in cal.frame_timestamps_us[frame])
    poses = [convert.se3_to_grpc_pose(meta.trajectory.pose_at(t) @ cal.T_sensor_rig) for t in (s, e)]
    return sensorsim_pb2.RGBRenderRequest(
        scene_id=scene_id,
        resolution_h=height,
        resolution_w=1,
        camera_intrinsics=spec if spec is not None else convert.camera_spec_from_intrinsics(camera, cal.intrinsics),
        frame_start_us=s,
        frame_end_us=e,
        sensor_pose=sensorsim_pb2.PosePair(start_pose=poses[0], end_pose=poses[1]),
        image_format=fmt,
        image_quality=95.0,
    )


def decode(image_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))


class WatchedLock:
    """A device lock (`servicer.device_locks[device]`) that counts the render workers reaching it: a test that
    holds the device learns when a call waits for it."""

    def __init__(self, lock):
        self._lock = lock
        self.arrived = threading.Semaphore(0)  # released once per worker that reached the lock

    def __enter__(self) -> WatchedLock:
        self.arrived.release()
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def watch_device_lock(monkeypatch, servicer) -> WatchedLock:
    """Puts a WatchedLock in front of the lock of a single-device servicer (until the test ends); the test
    itself takes the device through `servicer.device_lock`, the lock underneath."""
    ((device, lock),) = servicer.device_locks.items()
    watched = WatchedLock(lock)
    monkeypatch.setitem(servicer.device_locks, device, watched)
    return watched


def acquire(semaphore: threading.Semaphore, times: int, timeout: float = 30.0) -> bool:
    """Takes `semaphore` `times` times, each within `timeout` seconds; False if one did not come."""
    return all(semaphore.acquire(timeout=timeout) for _ in range(times))


def wait_for_idle_render_workers(servicer, timeout: float = 60.0) -> None:
    """Returns once every render job the servicer was given has finished, the calls' own work included (a call
    whose client has gone still runs until its next check). One blocker per render thread must hold every
    thread of `servicer.render_pool` at once, which happens only when no earlier job still runs or waits; the
    pool has `max_workers` threads per device (SensorsimServicer.__init__)."""
    threads = servicer.options.max_workers * len(servicer.device_locks)
    all_held = threading.Barrier(threads + 1, timeout=timeout)
    for _ in range(threads):
        servicer.render_pool.submit(all_held.wait)
    all_held.wait()
