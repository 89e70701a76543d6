"""A NuRec client that knows nothing of nurec_jax: it compiles protos/*.proto itself (as a client
built against NRE's protos would) and drives a running server. Prints a JSON summary.

    python standalone_client.py PROTO_DIR PORT SCENE_ID
"""

import io
import json
import sys
import tempfile

import grpc
import numpy as np
from grpc_tools import protoc
from PIL import Image


def quat_matrix(q):
    w, x, y, z = q.w, q.x, q.y, q.z
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def to_matrix(pose):
    m = np.eye(4)
    m[:3, :3] = quat_matrix(pose.quat)
    m[:3, 3] = (pose.vec.x, pose.vec.y, pose.vec.z)
    return m


def to_pose(common_pb2, m):
    r = m[:3, :3]
    w = np.sqrt(max(1e-12, 1 + np.trace(r))) / 2
    x = (r[2, 1] - r[1, 2]) / (4 * w)
    y = (r[0, 2] - r[2, 0]) / (4 * w)
    z = (r[1, 0] - r[0, 1]) / (4 * w)
    return common_pb2.Pose(
        vec=common_pb2.Vec3(x=m[0, 3], y=m[1, 3], z=m[2, 3]), quat=common_pb2.Quat(w=w, x=x, y=y, z=z)
    )


def main():
    proto_dir, port, scene_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    out = tempfile.mkdtemp()
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"{proto_dir}/common.proto",
            f"{proto_dir}/sensorsim.proto",
        ]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, out)
    import common_pb2
    import sensorsim_pb2
    import sensorsim_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = sensorsim_pb2_grpc.SensorsimServiceStub(channel)
    summary = {}
    summary["version"] = stub.get_version(common_pb2.Empty(), wait_for_ready=True, timeout=30).version_id
    summary["scenes"] = list(stub.get_available_scenes(common_pb2.Empty()).scene_ids)
    cams = stub.get_available_cameras(sensorsim_pb2.AvailableCamerasRequest(scene_id=scene_id)).available_cameras
    summary["cameras"] = [c.logical_id for c in cams]
    traj = (
        stub.get_available_trajectories(sensorsim_pb2.AvailableTrajectoriesRequest(scene_id=scene_id))
        .available_trajectories[0]
        .trajectory
    )
    sample = traj.poses[10]
    cam = cams[0]
    cam_to_world = to_matrix(sample.pose) @ to_matrix(cam.rig_to_camera)
    pose = to_pose(common_pb2, cam_to_world)
    t = sample.timestamp_us
    req = sensorsim_pb2.RGBRenderRequest(
        scene_id=scene_id,
        resolution_h=36,
        resolution_w=64,
        camera_intrinsics=cam.intrinsics,
        frame_start_us=t,
        frame_end_us=t + 1,
        sensor_pose=sensorsim_pb2.PosePair(start_pose=pose, end_pose=pose),
        image_format=sensorsim_pb2.PNG,
    )
    img = Image.open(io.BytesIO(stub.render_rgb(req, timeout=300).image_bytes))
    summary["image"] = [img.format, img.width, img.height, float(np.asarray(img).std())]
    batch = stub.batch_render_rgb(
        sensorsim_pb2.BatchRGBRenderRequest(
            items=[sensorsim_pb2.BatchRGBRenderRequestItem(camera_name=cam.logical_id, request=req)]
        ),
        timeout=300,
    )
    summary["batch"] = [(i.camera_name, i.success) for i in batch.items]
    try:
        stub.render_rgb(sensorsim_pb2.RGBRenderRequest(scene_id="unknown-scene"), timeout=30)
    except grpc.RpcError as e:
        summary["unknown_scene"] = e.code().name
    summary["nurec_jax_imported"] = any(m.startswith("nurec_jax") for m in sys.modules)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
