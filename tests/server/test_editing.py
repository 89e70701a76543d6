"""Actor editing on a real server: edit_assets (replace, insert), restore_model_parameters, the asset bank,
failures that answer clearly and change nothing, and edits that survive the scene leaving the model cache."""

from __future__ import annotations

import pathlib

import grpc
import numpy as np
import pytest
from grpc_helpers import connect, decode, rgb_request

from nurec_jax import read_scene_metadata
from nurec_jax._proto import common_pb2, sensorsim_pb2
from nurec_jax.ply import write_ply_gaussians
from nurec_jax.render import RenderOptions
from nurec_jax.renderer import Renderer
from nurec_jax.server import convert
from nurec_jax.server.app import create_server
from nurec_jax.server.options import ServerOptions

pytestmark = pytest.mark.xdist_group("grpc")

SID = "thin-street"
FRAME = 20  # track "3" (a red car) drives ahead of the ego in the front camera
HEIGHT = 54


@pytest.fixture(scope="module")
def server(thin_scene, tmp_path_factory):
    renderer = Renderer(RenderOptions(pair_capacity=1 << 16))
    opts = ServerOptions(
        artifact_glob=thin_scene, port=0, enable_editing_actors=True, asset_dir=str(tmp_path_factory.mktemp("assets"))
    )
    srv, port = create_server("127.0.0.1:0", opts, renderer=renderer)
    assert srv.serving.wait(30)
    channel, stub = connect(port)
    yield srv, stub
    channel.close()
    srv.stop(1)


def _render(stub, scene):
    return decode(stub.render_rgb(rgb_request(scene, SID, frame=FRAME, height=HEIGHT)).image_bytes).astype(int)


def _objects(stub):
    return {
        o.id: o
        for o in stub.get_dynamic_objects(sensorsim_pb2.AvailableDynamicObjectsRequest(scene_id=SID)).dynamic_objects
    }


def _edit(stub, **kw):
    return stub.edit_assets(sensorsim_pb2.EditAssetsRequest(scene_id=SID, **kw))


def _replace(original, replacement, size=None):
    a = sensorsim_pb2.ReplaceAssetAction(original_id=original, replacement_id=replacement)
    if size is not None:
        a.object_size.CopyFrom(common_pb2.AABB(size_x=size[0], size_y=size[1], size_z=size[2]))
    return a


def _ahead_track(scene, track_id, asset_id, metres=14.0, lateral=-0.2):
    """A new track parked `metres` ahead of the ego at FRAME's exposure (world frame)."""
    meta = read_scene_metadata(scene)
    s_us = int(meta.cameras["camera_front_wide_120fov"].frame_timestamps_us[FRAME][0])
    rig = meta.trajectory.pose_at(s_us)
    pose = rig.copy()
    pose[:3, 3] = rig[:3, 3] + rig[:3, 0] * metres + rig[:3, 1] * lateral
    pose[2, 3] = 0.75
    traj = convert.trajectory_to_proto([s_us - 1_000_000, s_us + 1_000_000], [pose, pose])
    return sensorsim_pb2.DynamicObjectTrack(
        id=track_id, semantic_class="automobile", trajectory=traj, asset_id=asset_id
    )


def test_asset_bank_listing(server):
    _, stub = server
    ids = stub.get_external_asset_objects(sensorsim_pb2.ExternalAssetObjectsRequest(scene_id=SID)).track_ids
    assert list(ids) == ["box_truck", "sedan_orange"]


def test_replace_insert_restore_and_failures(server, thin_scene, tmp_path):
    srv, stub = server
    original = _render(stub, thin_scene)
    before_objects = _objects(stub)
    assert before_objects["3"].asset_id == "none"

    # Failures answer in-band, name the field, and change nothing.
    ply = pathlib.Path(srv.options.asset_dir) / "blob.ply"  # file assets come from --asset-dir only
    write_ply_gaussians(
        ply,
        np.zeros((4, 3)),
        np.tile([1.0, 0, 0, 0], (4, 1)),
        np.full((4, 3), -2.0),
        np.full(4, 2.0),
        np.zeros((4, 1, 3)),
    )
    failures = [
        (dict(replace=[_replace("99", "box_truck")]), "replace[0].original_id"),
        (dict(replace=[_replace("3", "no_such_asset")]), "replace[0].replacement_id"),
        (dict(replace=[_replace("3", "box_truck", (4.0, -1.0, 2.0))]), "replace[0].object_size"),
        (dict(replace=[_replace("3", str(ply))]), "replace[0].object_size: required for a .ply path"),
        (dict(replace=[_replace("3", "box_truck"), _replace("3", "sedan_orange")]), "replaced twice"),
        (dict(insert=[_ahead_track(thin_scene, "7", "sedan_orange")]), "insert[0].id"),
        # A valid replacement followed by a bad insert: the whole request is refused.
        (
            dict(replace=[_replace("3", "box_truck")], insert=[_ahead_track(thin_scene, "new", "")]),
            "insert[0].asset_id",
        ),
        (dict(), "no replace or insert"),
    ]
    for kw, expected in failures:
        reply = _edit(stub, **kw)
        assert not reply.success and reply.message.startswith("Failed to edit assets: "), reply
        assert expected in reply.message, (expected, reply.message)
    assert _objects(stub)["3"].asset_id == "none"
    np.testing.assert_array_equal(_render(stub, thin_scene), original)
    with pytest.raises(grpc.RpcError) as info:
        stub.edit_assets(sensorsim_pb2.EditAssetsRequest(scene_id="nope", replace=[_replace("3", "box_truck")]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    # Replace the red car with the truck (the bank's size), insert an orange sedan ahead.
    reply = _edit(
        stub, replace=[_replace("3", "box_truck")], insert=[_ahead_track(thin_scene, "new_sedan", "sedan_orange")]
    )
    assert reply.success and reply.message == "Success"
    objs = _objects(stub)
    assert objs["3"].asset_id == "box_truck" and objs["3"].object_size.size_z == pytest.approx(3.3)
    assert objs["new_sedan"].asset_id == "sedan_orange" and objs["new_sedan"].semantic_class == "automobile"
    # The truck keeps the car's floor: its centre rises by half the height difference.
    z0 = before_objects["3"].trajectory.poses[0].pose.vec.z
    assert objs["3"].trajectory.poses[0].pose.vec.z == pytest.approx(z0 + (3.3 - 1.5) / 2, abs=1e-5)
    edited = _render(stub, thin_scene)
    diff = np.abs(edited - original).max(-1)
    assert (diff > 40).sum() > 20, "the edit is not visible"
    orange = (edited[..., 0] > 170) & (edited[..., 1] > 70) & (edited[..., 1] < 170) & (edited[..., 2] < 90)
    assert orange.sum() >= 4, "the inserted orange sedan is not in the image"

    # Edits belong to the scene, not to one cached copy: they survive an eviction and reload.
    srv.scene_cache.drop(SID)
    np.testing.assert_array_equal(_render(stub, thin_scene), edited)

    # A second edit builds on the first; restore undoes both.
    assert _edit(stub, replace=[_replace("7", "sedan_orange", (5.0, 2.0, 1.6))]).success
    assert _objects(stub)["7"].object_size.size_x == pytest.approx(5.0)
    stub.restore_model_parameters(sensorsim_pb2.RestoreModelParametersRequest(scene_id=SID))
    assert set(_objects(stub)) == set(before_objects) and _objects(stub)["3"].asset_id == "none"
    np.testing.assert_array_equal(_render(stub, thin_scene), original)
