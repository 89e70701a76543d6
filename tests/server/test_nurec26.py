"""NuRec 26.x clients: the renamed proto package, AlpaSim's ego_pose, and a server started with no scene.

NuRec 26.10 renames its proto packages `nre.grpc.protos.*` -> `nurec.grpc.protos.*`; clients generated from
the renamed protos call `/nurec.grpc.protos.sensorsim.SensorsimService/<method>`. One server answers a
client of each proto set with the same bytes."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import CAM, HEIGHT, decode, rgb_request
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from nurec_jax import read_scene_metadata
from nurec_jax._proto import common_pb2, sensorsim_pb2_grpc
from nurec_jax._proto.nurec import common_pb2 as nurec_common_pb2
from nurec_jax._proto.nurec import sensorsim_pb2 as nurec_sensorsim_pb2
from nurec_jax._proto.nurec import sensorsim_pb2_grpc as nurec_sensorsim_pb2_grpc
from nurec_jax.server import convert
from nurec_jax.server.app import create_server
from nurec_jax.server.options import ServerOptions

pytestmark = pytest.mark.xdist_group("grpc")

NRE = "nre.grpc.protos.sensorsim.SensorsimService"
NUREC = "nurec.grpc.protos.sensorsim.SensorsimService"
SID = "downloaded-street"


@pytest.fixture(scope="module")
def started(thin_scene, tmp_path_factory):
    """A server started with no scene at all (NuRec 26.10 allows it), one scene served over HTTP."""
    tmp = tmp_path_factory.mktemp("nurec26")
    www = tmp / "www"
    www.mkdir()
    shutil.copyfile(thin_scene, www / "scene.usdz")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    opts = ServerOptions(port=0, download_cache_dir=str(tmp / "dl"), download_allow_private=True)
    srv, port = create_server("127.0.0.1:0", opts)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{httpd.server_address[1]}/scene.usdz"
    yield srv, channel, url
    channel.close()
    srv.stop(0.5)
    httpd.shutdown()
    httpd.server_close()


def test_both_service_names_in_health_and_reflection(started):
    srv, channel, _ = started
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", NRE, NUREC):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, name
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {NRE, NUREC, "grpc.health.v1.Health"} <= services
    # Reflection describes the renamed service with the renamed message types.
    db = ProtoReflectionDescriptorDatabase(channel)
    assert db.FindFileContainingSymbol(NUREC).package == "nurec.grpc.protos.sensorsim"


def test_clients_of_both_proto_sets_render_a_downloaded_scene(started, thin_scene):
    srv, channel, url = started
    old = sensorsim_pb2_grpc.SensorsimServiceStub(channel)
    new = nurec_sensorsim_pb2_grpc.SensorsimServiceStub(channel)
    assert list(old.get_available_scenes(common_pb2.Empty(), timeout=10).scene_ids) == []
    md = (("x-nre-scene-url", url), ("x-nre-scene-id", SID))
    # The first call that names the scene (from a NuRec 26.x client) downloads it.
    cams = new.get_available_cameras(nurec_sensorsim_pb2.AvailableCamerasRequest(scene_id=SID), metadata=md, timeout=60)
    assert isinstance(cams, nurec_sensorsim_pb2.AvailableCamerasReturn) and len(cams.available_cameras) == 4
    assert list(old.get_available_scenes(common_pb2.Empty(), timeout=10).scene_ids) == [SID]
    assert (
        new.get_version(nurec_common_pb2.Empty(), timeout=10).version_id
        == old.get_version(common_pb2.Empty(), timeout=10).version_id
    )

    req = rgb_request(thin_scene, SID, frame=10)
    a = decode(old.render_rgb(req, timeout=300).image_bytes)
    renamed = nurec_sensorsim_pb2.RGBRenderRequest.FromString(req.SerializeToString())
    b = decode(new.render_rgb(renamed, timeout=300).image_bytes)
    assert a.shape == (HEIGHT, 64, 3) and a.std() > 1.0
    np.testing.assert_array_equal(a, b)

    # AlpaSim's ego_pose: the rig pose instead of the camera's renders the same image.
    meta = read_scene_metadata(thin_scene)
    ego = nurec_sensorsim_pb2.RGBRenderRequest.FromString(req.SerializeToString())
    ego.ClearField("sensor_pose")
    ego.camera_intrinsics.logical_id = CAM
    rig = [
        nurec_common_pb2.Pose.FromString(convert.se3_to_grpc_pose(meta.trajectory.pose_at(t)).SerializeToString())
        for t in (req.frame_start_us, req.frame_end_us)
    ]
    ego.ego_pose.CopyFrom(nurec_sensorsim_pb2.PosePair(start_pose=rig[0], end_pose=rig[1]))
    c = decode(new.render_rgb(ego, timeout=300).image_bytes)
    assert np.abs(c.astype(int) - a.astype(int)).max() <= 2  # float32 pose composition, PNG rounding
    # Both poses, disagreeing: INVALID_ARGUMENT naming both fields, from either service name.
    ego.sensor_pose.CopyFrom(renamed.sensor_pose)
    ego.ego_pose.start_pose.vec.x += 1.0
    with pytest.raises(grpc.RpcError) as info:
        new.render_rgb(ego, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sensor_pose.start_pose and ego_pose.start_pose disagree" in info.value.details()
