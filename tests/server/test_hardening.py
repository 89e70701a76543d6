"""Hostile and malformed input on a real server: over-long and huge ids (refused, never echoed whole into
a status or the log), undecodable request bytes, a batch item naming another scene, latency figures
that ignore refused calls, the editing flag and --asset-dir for file assets, and a zip/gzip bomb
scene. After every bad request a good one still works."""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
import zipfile

import grpc
import numpy as np
import pytest
from grpc_helpers import HEIGHT, connect, decode, rgb_request, rpc_error

from nurec_jax._proto import common_pb2, sensorsim_pb2
from nurec_jax.ply import write_ply_gaussians
from nurec_jax.render import RenderOptions
from nurec_jax.renderer import Renderer
from nurec_jax.scene import LoadOptions
from nurec_jax.server import request_errors as errs
from nurec_jax.server.app import create_server
from nurec_jax.server.options import ServerOptions
from nurec_jax.server.scene_editor import SceneEditor
from nurec_jax.server.servicer import Stats

pytestmark = pytest.mark.xdist_group("grpc")

SID = "thin-street"
SERVICE = "/nre.grpc.protos.sensorsim.SensorsimService"
E = common_pb2.Empty()


@pytest.fixture(scope="module")
def renderer():
    return Renderer(RenderOptions(pair_capacity=1 << 16))


@pytest.fixture(scope="module")
def scenes(thin_scene, tmp_path_factory):
    """A glob directory with the thin scene (a link) and `bomb.usdz`: a stored `.nurec` member whose
    64 KB gzip stream inflates to 64 MiB."""
    d = tmp_path_factory.mktemp("hardening_scenes")
    os.symlink(thin_scene, d / "thin.usdz")
    with zipfile.ZipFile(d / "bomb.usdz", "w", zipfile.ZIP_STORED) as z:
        z.writestr("volume.nurec", gzip.compress(b"\0" * (64 << 20), compresslevel=9))
    return d


@pytest.fixture(scope="module")
def server(scenes, renderer, tmp_path_factory):
    assets = tmp_path_factory.mktemp("assets")
    opts = ServerOptions(
        artifact_glob=str(scenes / "*.usdz"), port=0, enable_editing_actors=True, asset_dir=str(assets)
    )
    srv, port = create_server(
        "127.0.0.1:0", opts, renderer=renderer, load_options=LoadOptions(ratio_floor_bytes=1 << 20)
    )
    assert srv.serving.wait(30)
    channel, stub = connect(port)
    yield srv, stub, channel
    channel.close()
    srv.stop(1)


def _good(stub, thin_scene):
    """A good render still works."""
    assert decode(stub.render_rgb(rgb_request(thin_scene, SID)).image_bytes).shape == (HEIGHT, 64, 3)


def test_long_ids_are_refused_and_never_echoed_whole(server, thin_scene, caplog):
    _, stub, _ = server
    caplog.set_level(logging.INFO)
    huge = "x" * (8 << 20)
    good = rgb_request(thin_scene, SID)

    def variant(**kw):
        r = sensorsim_pb2.RGBRenderRequest()
        r.CopyFrom(good)
        for k, v in kw.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    setattr(getattr(r, k), kk, vv)
            elif isinstance(v, list):
                getattr(r, k).extend(v)
            else:
                setattr(r, k, v)
        return r

    obj = sensorsim_pb2.DynamicObject(track_id="t" * 300)
    obj.pose_pair.CopyFrom(good.sensor_pose)
    cases = [
        (stub.render_rgb, variant(scene_id=huge), "scene_id: 'xxx", f"({8 << 20} chars)"),
        (stub.render_rgb, variant(scene_id="y" * 257), "scene_id: 'yyy", "longer than 256"),
        (stub.get_available_cameras, sensorsim_pb2.AvailableCamerasRequest(scene_id=huge), "scene_id", "chars)"),
        (
            stub.render_rgb,
            variant(camera_intrinsics={"logical_id": "c" * 1000}),
            "camera_intrinsics.logical_id",
            "longer than 256",
        ),
        (stub.render_rgb, variant(dynamic_objects=[obj]), "dynamic_objects[0].track_id", "longer than 256"),
        (
            stub.batch_render_rgb,
            sensorsim_pb2.BatchRGBRenderRequest(
                items=[sensorsim_pb2.BatchRGBRenderRequestItem(request=variant(scene_id=huge))]
            ),
            "items[0].request.scene_id",
            "longer than 256",
        ),
        (
            stub.edit_assets,
            sensorsim_pb2.EditAssetsRequest(
                scene_id=SID,
                replace=[sensorsim_pb2.ReplaceAssetAction(original_id="o" * 5000, replacement_id="box_truck")],
            ),
            "replace[0].original_id",
            "longer than 256",
        ),
    ]
    for fn, request, field, text in cases:
        code, details = rpc_error(fn, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, details[:300])
        assert field in details and text in details and len(details) < 1000, details[:300]
    # An unknown id that is merely long: NOT_FOUND, quoted truncated with its length.
    code, details = rpc_error(stub.render_rgb, variant(scene_id="z" * 200))
    assert code == grpc.StatusCode.NOT_FOUND and "(200 chars)" in details and "z" * 65 not in details
    # Scene headers: the id and the URL are bounded too.
    for md, field in [
        ((("x-nre-scene-url", "file:///x.usdz"), ("x-nre-scene-id", "i" * 1000)), "x-nre-scene-id"),
        ((("x-nre-scene-url", "file:///" + "u" * 5000), ("x-nre-scene-id", "ok")), "x-nre-scene-url"),
    ]:
        code, details = rpc_error(stub.get_version, E, metadata=md)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details and len(details) < 1000
    assert max(len(r.getMessage()) for r in caplog.records) < 5000  # nothing huge reached the log
    _good(stub, thin_scene)


def test_undecodable_request_bytes_are_invalid_argument(server, thin_scene):
    _, stub, channel = server
    garbage = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # field 1, a length that is no varint
    for rpc, type_name in [
        ("render_rgb", "RGBRenderRequest"),
        ("get_available_cameras", "AvailableCamerasRequest"),
        ("edit_assets", "EditAssetsRequest"),
    ]:
        raw = channel.unary_unary(f"{SERVICE}/{rpc}")  # no serializers: bytes as they are
        code, details = rpc_error(raw, garbage, timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc, code, details)
        assert details.startswith(f"{rpc}: ") and type_name in details, details
    _good(stub, thin_scene)


def test_a_batch_item_naming_another_scene_fails_alone(server, thin_scene):
    _, stub, _ = server
    good = rgb_request(thin_scene, SID)
    other = rgb_request(thin_scene, SID)
    other.scene_id = "bomb"
    batch = sensorsim_pb2.BatchRGBRenderRequest(
        items=[
            sensorsim_pb2.BatchRGBRenderRequestItem(camera_name="a", request=good),
            sensorsim_pb2.BatchRGBRenderRequestItem(camera_name="b", request=other),
            sensorsim_pb2.BatchRGBRenderRequestItem(camera_name="c", request=good),
        ]
    )
    items = stub.batch_render_rgb(batch).items
    assert [i.success for i in items] == [True, False, True]
    assert items[1].error_message.startswith("INVALID_ARGUMENT: items[1].request.scene_id: 'bomb' differs")
    assert not items[1].HasField("result")
    assert decode(items[2].result.image_bytes).shape == (HEIGHT, 64, 3)


def test_latency_counts_successful_renders_only():
    stats = Stats()
    stats.record("render_rgb", grpc.StatusCode.INVALID_ARGUMENT, 0.001)
    stats.record("render_rgb", grpc.StatusCode.CANCELLED, 0.002)
    stats.record("render_rgb", grpc.StatusCode.OK, 2.0)
    stats.record("get_version", grpc.StatusCode.OK, 0.001)
    assert list(stats.latencies_s) == [2.0]
    assert stats.status == {"INVALID_ARGUMENT": 1, "CANCELLED": 1, "OK": 2}


def test_refused_renders_leave_the_latency_figures_alone(server, thin_scene):
    srv, stub, _ = server
    _good(stub, thin_scene)
    before = len(srv.servicer.stats.latencies_s)
    refused = srv.servicer.stats.status["NOT_FOUND"]
    for _ in range(5):
        rpc_error(stub.render_rgb, rgb_request(thin_scene, SID, spec=sensorsim_pb2.CameraSpec(logical_id="cam_x")))
    assert len(srv.servicer.stats.latencies_s) == before
    assert srv.servicer.stats.status["NOT_FOUND"] == refused + 5
    config = stub.get_server_config(E).server_config
    assert float(config["stats.render_latency_p50_s"]) > 0.0
    assert "NOT_FOUND" in config["stats.status"]


def test_edit_assets_needs_the_editing_flag(thin_scene, renderer):
    srv, port = create_server("127.0.0.1:0", ServerOptions(artifact_glob=thin_scene, port=0), renderer=renderer)
    channel, stub = connect(port)
    try:
        code, details = rpc_error(
            stub.edit_assets,
            sensorsim_pb2.EditAssetsRequest(
                scene_id=SID, replace=[sensorsim_pb2.ReplaceAssetAction(original_id="3", replacement_id="/etc/x.ply")]
            ),
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "--enable-editing-actors" in details
        assert "/etc" not in details
        # restore_model_parameters has nothing to undo and stays allowed (render-grpc calls it at the end).
        stub.restore_model_parameters(sensorsim_pb2.RestoreModelParametersRequest(scene_id=SID))
        assert (
            len(stub.get_available_cameras(sensorsim_pb2.AvailableCamerasRequest(scene_id=SID)).available_cameras) == 4
        )
    finally:
        channel.close()
        srv.stop(1)


def _ply(path):
    write_ply_gaussians(
        path,
        np.zeros((4, 3)),
        np.tile([1.0, 0, 0, 0], (4, 1)),
        np.full((4, 3), -2.0),
        np.full(4, 2.0),
        np.zeros((4, 1, 3)),
    )
    return str(path)


def test_file_assets_only_from_the_asset_dir(server, tmp_path):
    srv, stub, _ = server
    inside = _ply(srv.options.asset_dir + "/blob.ply")
    outside = _ply(tmp_path / "outside.ply")
    os.symlink(outside, os.path.join(srv.options.asset_dir, "link.ply"))
    size = common_pb2.AABB(size_x=4.0, size_y=2.0, size_z=1.5)

    def request(asset):
        return sensorsim_pb2.EditAssetsRequest(
            scene_id=SID,
            replace=[sensorsim_pb2.ReplaceAssetAction(original_id="3", replacement_id=asset, object_size=size)],
        )

    def edit(asset):
        return stub.edit_assets(request(asset))

    denied = {}
    for asset in (
        outside,
        str(tmp_path / "missing.ply"),
        "link.ply",
        "../" + os.path.basename(outside),
        "/etc/passwd.ply",
    ):
        code, details = rpc_error(edit, asset)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "replace[0].replacement_id" in details, details
        denied[asset] = details.replace(errs.quoted(asset), "<asset>")
    assert len(set(denied.values())) == 1  # the same words whether or not the file exists
    # Inside the directory: by relative or absolute path; a missing one is an in-band failure.
    reply = edit("nope.ply")
    assert not reply.success and "no asset file 'nope.ply' in --asset-dir" in reply.message
    assert edit("blob.ply").success and edit(inside).success
    stub.restore_model_parameters(sensorsim_pb2.RestoreModelParametersRequest(scene_id=SID))
    # Without --asset-dir no path is read at all.
    with pytest.raises(errs.PermissionDenied, match="--asset-dir"):
        SceneEditor(srv.registry).parse(request(inside))  # an editor built without asset_dir


def test_a_bomb_scene_is_refused_and_the_server_keeps_serving(server, thin_scene):
    srv, stub, _ = server
    request = rgb_request(thin_scene, "bomb")  # its own intrinsics: the bomb has no cameras of its own
    assert "bomb" in stub.get_available_scenes(E).scene_ids  # registered: its metadata is fine
    for _ in range(2):  # a failed load is not cached: each try is refused the same way
        code, details = rpc_error(stub.render_rgb, request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
        assert "bomb.usdz:volume.nurec" in details and "200:1" in details, details
    assert not srv.scene_cache.is_loaded("bomb")
    _good(stub, thin_scene)


def test_serve_grpc_refuses_a_missing_asset_dir_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nurec_jax.cli.serve_grpc",
            "--port=0",
            f"--asset-dir={tmp_path / 'nope'}",
            "--compilation-cache-dir=",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--asset-dir" in proc.stderr and "Traceback" not in proc.stderr
    assert len([l for l in proc.stderr.splitlines() if "serve-grpc:" in l]) == 1
