"""The wire contract: our protos carry NuRec's packages, service, names, numbers and types."""

import os
import subprocess
import sys

from google.protobuf import descriptor

from nurec_jax._proto import common_pb2, sensorsim_pb2, sensorsim_pb2_grpc

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FD = descriptor.FieldDescriptor


def test_generated_modules_are_up_to_date():
    out = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "tools", "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def _fields(msg):
    return {f.name: (f.number, f.type, f.is_repeated) for f in msg.DESCRIPTOR.fields}


def test_service_identity_and_rpcs():
    svc = sensorsim_pb2.DESCRIPTOR.services_by_name["SensorsimService"]
    assert svc.full_name == "nre.grpc.protos.sensorsim.SensorsimService"
    assert sorted(m.name for m in svc.methods) == sorted(
        [
            "render_rgb",
            "batch_render_rgb",
            "render_lidar",
            "render_aggregated",
            "get_version",
            "get_server_config",
            "get_available_scenes",
            "get_loaded_scenes",
            "shut_down",
            "get_available_cameras",
            "get_available_trajectories",
            "get_available_ego_masks",
            "get_external_asset_objects",
            "get_dynamic_objects",
            "edit_assets",
            "restore_model_parameters",
        ]
    )
    assert all(not m.client_streaming and not m.server_streaming for m in svc.methods)
    assert common_pb2.DESCRIPTOR.package == "nre.grpc.protos.common"
    assert hasattr(sensorsim_pb2_grpc, "SensorsimServiceStub")


def test_renamed_nurec_26_protos_describe_the_same_wire():
    """NuRec 26.x's package rename: every message of both sets has the same fields, numbers and types."""
    from nurec_jax._proto.nurec import common_pb2 as new_common
    from nurec_jax._proto.nurec import sensorsim_pb2 as new_sensorsim

    svc = new_sensorsim.DESCRIPTOR.services_by_name["SensorsimService"]
    assert svc.full_name == "nurec.grpc.protos.sensorsim.SensorsimService"
    assert new_common.DESCRIPTOR.package == "nurec.grpc.protos.common"
    old_svc = sensorsim_pb2.DESCRIPTOR.services_by_name["SensorsimService"]
    assert [m.name for m in svc.methods] == [m.name for m in old_svc.methods]
    for old_mod, new_mod in ((common_pb2, new_common), (sensorsim_pb2, new_sensorsim)):
        assert sorted(old_mod.DESCRIPTOR.message_types_by_name) == sorted(new_mod.DESCRIPTOR.message_types_by_name)
        for name, old_msg in old_mod.DESCRIPTOR.message_types_by_name.items():
            new_msg = new_mod.DESCRIPTOR.message_types_by_name[name]
            assert [(f.name, f.number, f.type) for f in old_msg.fields] == [
                (f.name, f.number, f.type) for f in new_msg.fields
            ], name


def test_common_field_numbers():
    assert _fields(common_pb2.Quat) == {
        "w": (1, FD.TYPE_FLOAT, False),
        "x": (2, FD.TYPE_FLOAT, False),
        "y": (3, FD.TYPE_FLOAT, False),
        "z": (4, FD.TYPE_FLOAT, False),
    }
    assert _fields(common_pb2.Pose) == {"vec": (1, FD.TYPE_MESSAGE, False), "quat": (2, FD.TYPE_MESSAGE, False)}
    assert _fields(common_pb2.PoseAtTime)["timestamp_us"] == (2, FD.TYPE_FIXED64, False)
    assert _fields(common_pb2.VersionId)["grpc_api_version"][0] == 3
    assert _fields(common_pb2.AvailableScenesReturn) == {"scene_ids": (1, FD.TYPE_STRING, True)}


def test_render_request_field_numbers():
    f = _fields(sensorsim_pb2.RGBRenderRequest)
    want = {
        "scene_id": (1, FD.TYPE_STRING),
        "resolution_h": (2, FD.TYPE_UINT32),
        "resolution_w": (3, FD.TYPE_UINT32),
        "camera_intrinsics": (4, FD.TYPE_MESSAGE),
        "frame_start_us": (5, FD.TYPE_FIXED64),
        "frame_end_us": (6, FD.TYPE_FIXED64),
        "sensor_pose": (7, FD.TYPE_MESSAGE),
        "dynamic_objects": (8, FD.TYPE_MESSAGE),
        "image_format": (9, FD.TYPE_ENUM),
        "image_quality": (10, FD.TYPE_FLOAT),
        "insert_ego_mask": (11, FD.TYPE_BOOL),
        "ego_mask_id": (12, FD.TYPE_MESSAGE),
        "ego_pose": (1013, FD.TYPE_MESSAGE),
    }
    assert {k: v[:2] for k, v in f.items()} == want
    cam = _fields(sensorsim_pb2.CameraSpec)
    assert cam["ftheta_param"][0] == 2 and cam["opencv_pinhole_param"][0] == 3 and cam["opencv_fisheye_param"][0] == 4
    assert cam["logical_id"][0] == 5 and cam["resolution_h"][0] == 7 and cam["resolution_w"][0] == 8
    assert cam["shutter_type"][0] == 9 and cam["bivariate_windshield_model_param"][0] == 10
    assert _fields(sensorsim_pb2.LidarSpec) == {"lidar_type": (2, FD.TYPE_ENUM, False)}
    lid = _fields(sensorsim_pb2.LidarRenderReturn)
    assert lid["num_points"][0] == 3 and lid["point_xyzs_buffer"] == (4, FD.TYPE_BYTES, False)
    assert _fields(sensorsim_pb2.BatchRGBRenderReturnItem)["error_message"] == (4, FD.TYPE_STRING, False)
    assert sensorsim_pb2.ShutterType.Value("GLOBAL") == 5 and sensorsim_pb2.ImageFormat.Value("RGB_UINT8_PLANAR") == 4
    assert sensorsim_pb2.LidarDeviceType.Value("AT128") == 1
    assert sensorsim_pb2.LidarRenderFilter.DESCRIPTOR.fields_by_name["opacity_threshold"].has_presence


def test_wire_bytes_by_hand():
    """Encodings a NuRec client produces, written out byte by byte."""
    import struct

    q = common_pb2.Quat(w=1.0, z=0.5)
    assert q.SerializeToString() == b"\x0d" + struct.pack("<f", 1.0) + b"\x25" + struct.pack("<f", 0.5)
    req = sensorsim_pb2.RGBRenderRequest(frame_start_us=7, image_format=sensorsim_pb2.JPEG)
    assert req.SerializeToString() == b"\x29" + struct.pack("<Q", 7) + b"\x48\x02"
