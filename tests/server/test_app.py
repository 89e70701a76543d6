"""The gRPC server, end to end on 127.0.0.1 port 0: every RPC, the error model, caching, health,
reflection, cancellation, warm-up and shutdown. One thin scene and one tiny resolution keep compiles
to a handful for the whole module."""

from __future__ import annotations

import io
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import (
    CAM,
    HEIGHT,
    acquire,
    connect,
    decode,
    rgb_request,
    rpc_error,
    wait_for_idle_render_workers,
    watch_device_lock,
)
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from nurec_jax import load_scene, read_scene_metadata
from nurec_jax._proto import common_pb2, sensorsim_pb2
from nurec_jax.render import RenderOptions
from nurec_jax.renderer import Renderer
from nurec_jax.server import convert, images, warmup
from nurec_jax.server import requests as req_lib
from nurec_jax.server.app import SERVICE_NAME, create_server
from nurec_jax.server.options import ServerOptions

pytestmark = pytest.mark.xdist_group("grpc")

SID = "thin-street"
E = common_pb2.Empty()


@pytest.fixture(scope="module")
def renderer():
    return Renderer(RenderOptions(pair_capacity=1 << 16))


@pytest.fixture(scope="module")
def hood_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hoods")
    (d / "rig_a").mkdir()
    hood = np.zeros((18, 32, 4), np.uint8)
    hood[9:] = (255, 0, 0, 255)  # bottom half: opaque red; top: transparent
    Image.fromarray(hood, "RGBA").save(d / "rig_a" / f"{CAM}.png")
    return str(d)


@pytest.fixture(scope="module")
def server(thin_scene, renderer, hood_dir, tmp_path_factory):
    opts = ServerOptions(
        artifact_glob=thin_scene,
        port=0,
        max_workers=2,
        enable_editing_actors=True,
        egocar_hood_dir=hood_dir,
        download_cache_dir=str(tmp_path_factory.mktemp("dl")),
    )
    srv, port = create_server("127.0.0.1:0", opts, renderer=renderer)
    assert srv.serving.wait(30)
    channel, stub = connect(port)
    yield srv, stub, channel
    channel.close()
    srv.stop(1)


def test_metadata_rpcs_answer_from_the_file(server, thin_scene):
    srv, stub, _ = server
    v = stub.get_version(E)
    assert v.version_id and v.git_hash
    assert (v.grpc_api_version.major, v.grpc_api_version.minor, v.grpc_api_version.patch) == (0, 0, 1)
    assert list(stub.get_available_scenes(E).scene_ids) == [SID]
    meta = read_scene_metadata(thin_scene)
    cams = stub.get_available_cameras(sensorsim_pb2.AvailableCamerasRequest(scene_id=SID)).available_cameras
    assert [c.logical_id for c in cams] == list(meta.cameras)
    front = next(c for c in cams if c.logical_id == CAM)
    np.testing.assert_allclose(convert.grpc_pose_to_se3(front.rig_to_camera), meta.cameras[CAM].T_sensor_rig, atol=1e-5)
    assert front.intrinsics.resolution_w == 1920 and front.intrinsics.HasField("ftheta_param")
    traj = stub.get_available_trajectories(sensorsim_pb2.AvailableTrajectoriesRequest(scene_id=SID))
    assert len(traj.available_trajectories) == 1
    assert len(traj.available_trajectories[0].trajectory.poses) == len(meta.trajectory.timestamps_us)
    objs = stub.get_dynamic_objects(sensorsim_pb2.AvailableDynamicObjectsRequest(scene_id=SID)).dynamic_objects
    controllable = [t.track_id for t in meta.tracks.values() if t.is_controllable]
    assert [o.id for o in objs] == controllable and all(o.asset_id == "none" for o in objs)
    assert objs[0].object_size.size_x > 0 and len(objs[0].trajectory.poses) > 1
    assert list(stub.get_external_asset_objects(sensorsim_pb2.ExternalAssetObjectsRequest(scene_id=SID)).track_ids) == [
        "box_truck",
        "sedan_orange",
    ]
    masks = stub.get_available_ego_masks(E).ego_mask_metadata
    assert [(m.ego_mask_id.rig_config_id, m.ego_mask_id.camera_logical_id) for m in masks] == [("rig_a", CAM)]
    config = stub.get_server_config(E).server_config
    for key in (
        "artifact_glob",
        "host",
        "port",
        "health_port",
        "test_scenes_are_valid",
        "renderer",
        "enable_difix",
        "difix_url",
        "difix_cache",
        "difix_model_filename",
        "difix_resolution",
        "ray_chunk_size",
        "egocar_hood_dir",
        "download_cache_dir",
        "download_cache_size",
        "max_workers",
        "enable_editing_actors",
        "cache_size",
        "metrics_output_dir",
    ):
        assert key in config, key
    assert config["max_workers"] == "2" and config["health_port"] == "null"
    assert config["difix_resolution"] == "(576, 1024)" and config["enable_editing_actors"] == "True"
    # None of that loaded the scene onto the device.
    if not srv.scene_cache.is_loaded(SID):
        assert list(stub.get_loaded_scenes(E).scenes) == []


def test_render_matches_the_library_and_never_recompiles(server, thin_scene, renderer):
    srv, stub, _ = server
    req = rgb_request(thin_scene, SID, frame=10)
    img = decode(stub.render_rgb(req).image_bytes)
    assert img.shape == (HEIGHT, 64, 3)
    # The same frame through the library directly.
    scene = load_scene(thin_scene)
    meta = read_scene_metadata(thin_scene)
    job = req_lib.prepare_rgb(meta, req, editing_enabled=False)
    out = renderer.render(
        scene.gaussians, job.camera, job.sensor_pose, req_lib.job_actor_poses(meta, scene.gaussians.track_ids, job)
    )
    ref = images.to_uint8(np.asarray(out.rgb))
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1
    assert img.std() > 10  # a real street, not a flat colour
    loaded = stub.get_loaded_scenes(E)
    assert [(s.scene_id, s.loaded_instance_count) for s in loaded.scenes] == [(SID, 1)]
    assert loaded.loaded_instance_capacity == 10
    # Other frames, poses and formats of the same camera and size reuse the compiled function.
    traces = renderer.trace_count
    for frame, fmt in ((40, sensorsim_pb2.JPEG), (80, sensorsim_pb2.RGB_UINT8_PLANAR)):
        r = rgb_request(thin_scene, SID, frame=frame, fmt=fmt)
        data = stub.render_rgb(r).image_bytes
        if fmt == sensorsim_pb2.RGB_UINT8_PLANAR:
            assert len(data) == 3 * HEIGHT * 64
        else:
            assert Image.open(io.BytesIO(data)).format == "JPEG"
    assert renderer.trace_count == traces


def test_error_codes_and_the_server_keeps_serving(server, thin_scene):
    _, stub, _ = server
    good = rgb_request(thin_scene, SID)
    cases = []

    def variant(**changes):
        r = sensorsim_pb2.RGBRenderRequest()
        r.CopyFrom(good)
        for k, v in changes.items():
            if hasattr(v, "DESCRIPTOR"):
                getattr(r, k).CopyFrom(v)
            else:
                setattr(r, k, v)
        return r

    cases.append((variant(scene_id="nope"), grpc.StatusCode.NOT_FOUND, "unknown scene 'nope'"))
    cases.append(
        (
            variant(camera_intrinsics=sensorsim_pb2.CameraSpec(logical_id="cam_x")),
            grpc.StatusCode.NOT_FOUND,
            "camera 'cam_x'",
        )
    )
    cases.append((variant(image_format=sensorsim_pb2.JPEG2000), grpc.StatusCode.INVALID_ARGUMENT, "image_format"))
    cases.append((variant(resolution_h=0, resolution_w=0), grpc.StatusCode.INVALID_ARGUMENT, "resolution"))
    cases.append((variant(frame_end_us=good.frame_start_us), grpc.StatusCode.OUT_OF_RANGE, "[t, t+1)"))
    cases.append((variant(frame_start_us=1, frame_end_us=2), grpc.StatusCode.OUT_OF_RANGE, "outside the time range"))
    cases.append((variant(sensor_pose=sensorsim_pb2.PosePair()), grpc.StatusCode.INVALID_ARGUMENT, "zero-norm"))
    cases.append(
        (
            variant(insert_ego_mask=True, ego_mask_id=sensorsim_pb2.EgoMaskId(rig_config_id="rig_zz")),
            grpc.StatusCode.NOT_FOUND,
            "rig_zz",
        )
    )
    for request, code, text in cases:
        got, details = rpc_error(stub.render_rgb, request)
        assert got == code and text in details, (got, details)
    assert (
        rpc_error(stub.get_available_cameras, sensorsim_pb2.AvailableCamerasRequest(scene_id="nope"))[0]
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        rpc_error(stub.get_dynamic_objects, sensorsim_pb2.AvailableDynamicObjectsRequest(scene_id=""))[0]
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    code, details = rpc_error(stub.render_lidar, sensorsim_pb2.LidarRenderRequest(scene_id=SID))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "frame_end_us" in details
    reply = stub.edit_assets(sensorsim_pb2.EditAssetsRequest(scene_id=SID))  # edit failures are in-band
    assert not reply.success and "no replace or insert" in reply.message
    assert (
        rpc_error(stub.restore_model_parameters, sensorsim_pb2.RestoreModelParametersRequest(scene_id="nope"))[0]
        == grpc.StatusCode.NOT_FOUND
    )
    code, details = rpc_error(stub.get_version, E, metadata=(("x-nre-scene-url", "file:///x.usdz"),))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "x-nre-scene-id" in details
    # Still serving.
    assert decode(stub.render_rgb(good).image_bytes).shape == (HEIGHT, 64, 3)


def test_batch_per_item_results(server, thin_scene):
    _, stub, _ = server
    good = rgb_request(thin_scene, SID, frame=20)
    bad_fmt = rgb_request(thin_scene, SID, frame=20, fmt=sensorsim_pb2.AVC)
    unknown_cam = rgb_request(thin_scene, SID, frame=20, spec=sensorsim_pb2.CameraSpec(logical_id="cam_x"))
    batch = sensorsim_pb2.BatchRGBRenderRequest(
        items=[
            sensorsim_pb2.BatchRGBRenderRequestItem(camera_name="a", request=good),
            sensorsim_pb2.BatchRGBRenderRequestItem(camera_name="b", request=bad_fmt),
            sensorsim_pb2.BatchRGBRenderRequestItem(camera_name="c", request=unknown_cam),
            sensorsim_pb2.BatchRGBRenderRequestItem(camera_name="d", request=good),
        ]
    )
    out = stub.batch_render_rgb(batch).items
    assert [i.camera_name for i in out] == ["a", "b", "c", "d"]
    assert [i.success for i in out] == [True, False, False, True]
    assert out[1].error_message.startswith("INVALID_ARGUMENT: ") and "image_format" in out[1].error_message
    assert out[2].error_message.startswith("NOT_FOUND: ") and not out[2].HasField("result")
    assert out[0].result.image_bytes == out[3].result.image_bytes == stub.render_rgb(good).image_bytes
    assert list(stub.batch_render_rgb(sensorsim_pb2.BatchRGBRenderRequest()).items) == []
    other = sensorsim_pb2.RGBRenderRequest()
    other.CopyFrom(good)
    other.scene_id = "other"
    batch.items[1].request.CopyFrom(other)
    mixed = stub.batch_render_rgb(batch).items  # an item naming another scene fails alone
    assert [i.success for i in mixed] == [True, False, False, True]
    assert mixed[1].error_message.startswith("INVALID_ARGUMENT: items[1].request.scene_id")
    agg = stub.render_aggregated(sensorsim_pb2.AggregatedRenderRequest(rgb_requests=[good]))
    assert [r.image_bytes for r in agg.rgb_returns] == [out[0].result.image_bytes]
    code, details = rpc_error(
        stub.render_aggregated,
        sensorsim_pb2.AggregatedRenderRequest(
            rgb_requests=[good], lidar_requests=[sensorsim_pb2.LidarRenderRequest(scene_id=SID)]
        ),
    )
    assert code == grpc.StatusCode.OUT_OF_RANGE and "lidar_requests[0].frame_end_us" in details


def test_ego_mask_and_actor_overrides(server, thin_scene):
    _, stub, _ = server
    plain = rgb_request(thin_scene, SID, frame=30)
    base = decode(stub.render_rgb(plain).image_bytes).astype(int)
    masked = sensorsim_pb2.RGBRenderRequest()
    masked.CopyFrom(plain)
    masked.insert_ego_mask = True
    masked.ego_mask_id.CopyFrom(sensorsim_pb2.EgoMaskId(rig_config_id="rig_a", camera_logical_id=CAM))
    img = decode(masked.SerializeToString() and stub.render_rgb(masked).image_bytes).astype(int)
    np.testing.assert_array_equal(img[:12], base[:12])
    assert np.all(img[24:] == (255, 0, 0))
    # Actor overrides: move every controllable actor far away; only the actors' pixels change.
    meta = read_scene_metadata(thin_scene)
    moved = sensorsim_pb2.RGBRenderRequest()
    moved.CopyFrom(plain)
    far = convert.se3_to_grpc_pose(
        np.diag([1.0, 1, 1, 1]) + np.pad(np.array([[0, 0, 0, 1e4]])[:, 1:].T, ((0, 1), (3, 0)))
    )
    tid = next(t for t, tr in meta.tracks.items() if tr.is_controllable)
    moved.dynamic_objects.append(
        sensorsim_pb2.DynamicObject(track_id=tid, pose_pair=sensorsim_pb2.PosePair(start_pose=far, end_pose=far))
    )
    img2 = decode(stub.render_rgb(moved).image_bytes).astype(int)
    assert np.abs(img2 - base).max() > 30  # the actors in view are gone


def test_health_and_reflection(server):
    srv, _, channel = server
    hs = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        assert hs.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    rs = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(rs.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_metadata_and_health_answer_while_a_render_compiles(server, thin_scene, monkeypatch):
    srv, stub, channel = server
    req = rgb_request(thin_scene, SID, camera="camera_rear_pinhole_70fov", height=24)  # a new compile
    on_device = threading.Event()
    monkeypatch.setattr(srv.servicer, "device_hook", lambda device: on_device.set())  # next: the compile
    done = threading.Event()
    result = {}

    def render():
        result["img"] = stub.render_rgb(req).image_bytes
        done.set()

    t = threading.Thread(target=render)
    t.start()
    assert on_device.wait(60)
    hs = health_pb2_grpc.HealthStub(channel)
    start = time.perf_counter()
    assert hs.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert stub.get_available_cameras(sensorsim_pb2.AvailableCamerasRequest(scene_id=SID), timeout=5)
    assert stub.get_version(E, timeout=5).version_id
    answered = time.perf_counter() - start
    assert not done.is_set(), "the render finished before the metadata calls; the test proves nothing"
    assert answered < 5
    t.join(120)
    assert decode(result["img"]).shape == (24, 42, 3)


def test_cancelled_and_expired_calls_skip_their_render(server, thin_scene, monkeypatch):
    srv, stub, _ = server
    req = rgb_request(thin_scene, SID, frame=50)
    stub.render_rgb(req)  # compiled and loaded
    stats = srv.servicer.stats
    before_renders, before_skipped = stats.renders, stats.skipped_cancelled
    device = watch_device_lock(monkeypatch, srv.servicer)
    cancelled = threading.Semaphore(0)  # released once per call the server counts as CANCELLED
    record = stats.record

    def record_and_tell(method, code, seconds):
        record(method, code, seconds)
        if code == grpc.StatusCode.CANCELLED:
            cancelled.release()

    monkeypatch.setattr(stats, "record", record_and_tell)
    with srv.servicer.device_lock:  # the device is busy with someone else's work
        code, _ = rpc_error(stub.render_rgb, req, timeout=0.5)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        fut = stub.render_rgb.future(req)
        assert acquire(device.arrived, 2)  # both calls wait for the device
        fut.cancel()
        assert acquire(cancelled, 2)  # the server has seen both calls end before the device frees up
    wait_for_idle_render_workers(srv.servicer)  # both workers took the device, found their call gone and let go
    assert stats.skipped_cancelled == before_skipped + 2
    assert stats.renders == before_renders


def test_scene_registered_by_request_metadata(server, thin_scene, tmp_path):
    # Local paths are refused (downloads over http: tests/server/test_downloads.py).
    _, stub, _ = server
    copy = tmp_path / "copy.usdz"
    shutil.copy(thin_scene, copy)
    md = (("x-nre-scene-url", f"file://{copy}"), ("x-nre-scene-id", "my-copy"))
    code, details = rpc_error(
        stub.get_available_cameras, sensorsim_pb2.AvailableCamerasRequest(scene_id="my-copy"), metadata=md
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "x-nre-scene-url" in details
    assert "my-copy" not in stub.get_available_scenes(E).scene_ids
    code, details = rpc_error(
        stub.get_version, E, metadata=(("x-nre-scene-url", "http://example.com/a.usdz"), ("x-nre-scene-id", "bad id!"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Invalid scene ID" in details


def test_warm_up_unavailable_then_serving_then_compiles(thin_scene, renderer, monkeypatch):
    gate = threading.Event()
    warmed = threading.Event()  # the compile warm-up has returned
    compile_warm_up = warmup.warm_up

    def warm_up_and_tell(*args, **kwargs):
        try:
            compile_warm_up(*args, **kwargs)
        finally:
            warmed.set()

    monkeypatch.setattr(warmup, "warm_up", warm_up_and_tell)

    def slow_loader(scene_id):
        gate.wait(30)
        return load_scene(thin_scene)

    srv, port = create_server(
        "127.0.0.1:0",
        ServerOptions(artifact_glob=thin_scene, port=0, test_scenes_are_valid=True, warmup_height=HEIGHT),
        loader=slow_loader,
        renderer=renderer,
    )
    channel, stub = connect(port)
    try:
        hs = health_pb2_grpc.HealthStub(channel)
        assert hs.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert stub.get_version(E, timeout=5).version_id  # metadata answers while warming up
        code, details = rpc_error(stub.render_rgb, rgb_request(thin_scene, SID), timeout=4.0)
        assert code == grpc.StatusCode.UNAVAILABLE and "still loading" in details
        gate.set()
        assert srv.serving.wait(30)
        assert hs.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        # The compile warm-up runs after SERVING: metadata answers meanwhile, and once it is done every
        # camera at the warm-up height renders without compiling.
        assert stub.get_version(E, timeout=5).version_id
        assert warmed.wait(300)
        cfg = stub.get_server_config(E).server_config
        n_cams = len(read_scene_metadata(thin_scene).cameras)
        assert cfg["warmup.state"] == "done" and cfg["warmup.rendered"] == f"{n_cams}/{n_cams}", dict(cfg)
        before = renderer.trace_count
        for cam in read_scene_metadata(thin_scene).cameras:
            decode(stub.render_rgb(rgb_request(thin_scene, SID, camera=cam), timeout=120).image_bytes)
        assert renderer.trace_count == before
    finally:
        gate.set()
        channel.close()
        srv.stop(1)


def test_separate_health_port(thin_scene, renderer):
    srv, port = create_server(
        "127.0.0.1:0", ServerOptions(artifact_glob=thin_scene, port=0, health_port=0), renderer=renderer
    )
    try:
        assert srv.serving.wait(30) and srv.health_port not in (None, port)
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.health_port}")
        hs = health_pb2_grpc.HealthStub(channel)
        assert (
            hs.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        channel.close()
    finally:
        srv.stop(1)


def test_out_of_memory_is_resource_exhausted(thin_scene, renderer):
    def oom_loader(scene_id):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB")

    srv, port = create_server(
        "127.0.0.1:0", ServerOptions(artifact_glob=thin_scene, port=0), loader=oom_loader, renderer=renderer
    )
    channel, stub = connect(port)
    try:
        code, details = rpc_error(stub.render_rgb, rgb_request(thin_scene, SID))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of device memory" in details
        assert list(stub.get_available_scenes(E).scene_ids) == [SID]  # still serving
    finally:
        channel.close()
        srv.stop(1)


def test_graceful_shutdown_lets_in_flight_calls_finish(thin_scene, renderer, monkeypatch):
    srv, port = create_server("127.0.0.1:0", ServerOptions(artifact_glob=thin_scene, port=0), renderer=renderer)
    channel, stub = connect(port)
    hs = health_pb2_grpc.HealthStub(channel)
    req = rgb_request(thin_scene, SID, frame=60)
    stub.render_rgb(req)  # loaded (compiled already by the module's server)
    device = watch_device_lock(monkeypatch, srv.servicer)
    assert srv.serving.wait(30)
    # Health watches, opened while the server still takes new calls: each sends the current status, then changes.
    watches = [hs.Watch(health_pb2.HealthCheckRequest(service=name), timeout=30) for name in ("", SERVICE_NAME)]
    assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * 2
    srv.servicer.device_lock.acquire()
    fut = stub.render_rgb.future(req, timeout=60)
    assert acquire(device.arrived, 1)  # the render is in flight, waiting for the device
    stub.shut_down(E, timeout=5)
    assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    for w in watches:
        w.cancel()  # an open stream would hold the shutdown open too
    assert not srv.wait_for_termination(timeout=0.1)  # the in-flight render holds the shutdown open
    srv.servicer.device_lock.release()
    assert decode(fut.result().image_bytes).shape == (HEIGHT, 64, 3)
    assert srv.wait_for_termination(timeout=30)
    with pytest.raises(grpc.RpcError):
        hs.Check(health_pb2.HealthCheckRequest(), timeout=2)
    channel.close()


def test_client_built_from_the_protos_alone(server):
    """A separate process that compiles protos/*.proto itself and never imports nurec_jax."""
    import json
    import os
    import subprocess
    import sys

    _, stub, _ = server
    here = os.path.dirname(os.path.abspath(__file__))
    protos = os.path.join(os.path.dirname(os.path.dirname(here)), "protos")
    port = server[0].port
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, os.path.join(here, "standalone_client.py"), protos, str(port), SID],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(here),
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert SID in got["scenes"] and CAM in got["cameras"]
    assert got["image"][:3] == ["PNG", 64, 36] and got["image"][3] > 10
    assert got["batch"] == [[CAM, True]]
    assert got["unknown_scene"] == "NOT_FOUND"
    assert got["nurec_jax_imported"] is False


def _lidar_request(thin_scene, lidar_type=sensorsim_pb2.AT128, spin=20):
    meta = read_scene_metadata(thin_scene)
    cal = meta.lidars["lidar_top_360fov"]
    s, e = (int(t) for t in cal.frame_timestamps_us[spin])
    poses = [convert.se3_to_grpc_pose(meta.trajectory.pose_at(t) @ cal.T_sensor_rig) for t in (s, e)]
    return sensorsim_pb2.LidarRenderRequest(
        scene_id=SID,
        lidar_config=sensorsim_pb2.LidarSpec(lidar_type=lidar_type),
        frame_start_us=s,
        frame_end_us=e,
        sensor_pose=sensorsim_pb2.PosePair(start_pose=poses[0], end_pose=poses[1]),
    )


def test_render_lidar(server, thin_scene):
    from nurec_jax import lidar_models
    from nurec_jax.server import requests as rq

    srv, stub, _ = server
    req = _lidar_request(thin_scene)
    reply = stub.render_lidar(req, timeout=600)
    n = reply.num_points
    pts = np.frombuffer(reply.point_xyzs_buffer, "<f4").reshape(-1, 3)
    inten = np.frombuffer(reply.point_intensities_buffer, "<f4")
    rings = np.frombuffer(reply.point_ring_ids_buffer, "<u2")
    assert n > 50000 and pts.shape == (n, 3) and inten.shape == (n,) and rings.shape == (n,)
    np.testing.assert_array_equal(np.asarray(reply.point_xyzs, np.float32), pts.reshape(-1))
    np.testing.assert_array_equal(np.asarray(reply.point_intensities, np.float32), inten)
    assert list(reply.point_ring_ids[:10]) == rings[:10].tolist()
    assert inten.min() >= 0 and inten.max() <= 1 and rings.max() < 128
    r = np.linalg.norm(pts, axis=1)
    assert r.min() >= 0.5 and r.max() <= 200
    # AT128 looks forward over 120 degrees: every point is in front (points seen early in the spin sit a
    # few degrees wider in the end-of-spin frame: the ego moved ~1 m forward meanwhile).
    az = np.abs(np.degrees(np.arctan2(pts[:, 1], pts[:, 0])))
    assert np.all(az < 75.0) and np.mean(az < 60.5) > 0.95
    # The same spin through the library.
    meta = read_scene_metadata(thin_scene)
    job = rq.prepare_lidar(meta, req, editing_enabled=False)
    assert job.model.name == "AT128" and job.opacity_threshold == 0.8
    scene = load_scene(thin_scene)
    spin = srv.lidar_caster.cast(
        scene.gaussians,
        lidar_models.at128(),
        job.sensor_pose,
        rq.job_actor_poses(meta, scene.gaussians.track_ids, job),
        ray_chunk_size=srv.options.ray_chunk_size,
    )
    ref_pts, ref_inten, _ = spin.returns(job.model, 0.8)
    np.testing.assert_allclose(pts, ref_pts, atol=1e-4)
    # A looser opacity threshold returns more points; bad filters and poses are refused.
    loose = sensorsim_pb2.LidarRenderRequest()
    loose.CopyFrom(req)
    loose.render_filter.opacity_threshold = 0.0
    assert stub.render_lidar(loose, timeout=600).num_points > n
    bad = sensorsim_pb2.LidarRenderRequest()
    bad.CopyFrom(req)
    bad.render_filter.opacity_threshold = 1.5
    code, details = rpc_error(stub.render_lidar, bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "render_filter.opacity_threshold" in details
    bad.CopyFrom(req)
    bad.ClearField("sensor_pose")
    code, details = rpc_error(stub.render_lidar, bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sensor_pose: missing" in details
    bad.CopyFrom(req)
    bad.scene_id = "nope"
    assert rpc_error(stub.render_lidar, bad)[0] == grpc.StatusCode.NOT_FOUND
    agg = stub.render_aggregated(
        sensorsim_pb2.AggregatedRenderRequest(rgb_requests=[rgb_request(thin_scene, SID)], lidar_requests=[req]),
        timeout=600,
    )
    assert len(agg.rgb_returns) == 1 and [x.num_points for x in agg.lidar_returns] == [n]


def test_a_server_stopped_before_it_reports_serving_stops_at_once(thin_scene, monkeypatch):
    """The start-up thread's health update may be queued on the event loop just as a stop ends that loop;
    it must notice the stop instead of waiting for a loop that runs no more."""
    import asyncio

    from nurec_jax.server.app import Server

    entered, release = threading.Event(), threading.Event()
    original = Server._set_health

    async def held(self, status):  # the SERVING update reaches the loop, then waits there while the server stops
        if status == health_pb2.HealthCheckResponse.SERVING:
            entered.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait)
        await original(self, status)

    monkeypatch.setattr(Server, "_set_health", held)
    srv, _ = create_server("127.0.0.1:0", ServerOptions(port=0, artifact_glob=thin_scene))
    try:
        assert entered.wait(60)
        stopper = threading.Thread(target=srv.stop, args=(0.1,))
        stopper.start()
        stopper.join(20)  # the start-up thread gave up at once (it used to wait 30 s on the dead loop)
        assert not stopper.is_alive()
        assert not srv.serving.is_set()
    finally:
        release.set()
