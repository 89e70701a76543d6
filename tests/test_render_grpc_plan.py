"""render-grpc's plan, run and write steps (nurec_jax/cli/render_jobs.py) without a server: hand-built proto answers in, jobs out; a fake
stub in place of the server; the summary files from fake image bytes."""

from __future__ import annotations

import io
import json
import os

import grpc
import numpy as np
import pytest
from PIL import Image, ImageSequence

from nurec_jax._proto import common_pb2, sensorsim_pb2
from nurec_jax.cli import render_jobs
from nurec_jax.cli.render_jobs import Answers, Options, PlanError, Results, plan_jobs, run_jobs, write_outputs
from nurec_jax.metadata import CameraCalibration, LidarCalibration, SceneMetadata

RIG_TS = [t * 100_000 for t in range(11)]  # 0 .. 1 s, 10 Hz; the rig moves 1 m along x per pose
CAL_WINDOWS = [(t, t + 30_000) for t in RIG_TS[:10]]  # cam_a's recorded exposures: 10 frames
SPINS = [(t, t + 100_000) for t in RIG_TS[:10]]  # the lidar's recorded spins


def _pose(x: float = 0.0) -> common_pb2.Pose:
    return common_pb2.Pose(vec=common_pb2.Vec3(x=x), quat=common_pb2.Quat(w=1.0))


def _answers(cameras=("cam_a", "cam_b"), masks=(), trajectories=1) -> Answers:
    trajs = sensorsim_pb2.AvailableTrajectoriesReturn()
    for idx in range(trajectories):
        t = trajs.available_trajectories.add(trajectory_idx=idx)
        for ts in RIG_TS:
            t.trajectory.poses.add(timestamp_us=ts, pose=_pose(ts / 100_000))
    cams = sensorsim_pb2.AvailableCamerasReturn()
    for cam_id in cameras:
        cams.available_cameras.add(
            logical_id=cam_id,
            intrinsics=sensorsim_pb2.CameraSpec(logical_id=cam_id, resolution_w=1920, resolution_h=1080),
            rig_to_camera=_pose(),
        )
    ego = sensorsim_pb2.AvailableEgoMasksReturn()
    for rig, cam_id in masks:
        ego.ego_mask_metadata.add().ego_mask_id.CopyFrom(
            sensorsim_pb2.EgoMaskId(rig_config_id=rig, camera_logical_id=cam_id)
        )
    return Answers(cameras=cams, trajectories=trajs, ego_masks=ego)


def _scene(lidar: bool = True) -> SceneMetadata:
    """The scene file's side: cam_a has recorded exposure windows, cam_b none (it walks the trajectory)."""
    cam_a = CameraCalibration("cam_a", "cam_a", np.eye(4), None, np.asarray(CAL_WINDOWS, np.int64))
    lidars = {}
    if lidar:
        lidars["lidar_top"] = LidarCalibration("lidar_top", "lidar_top", np.eye(4), "", {}, np.asarray(SPINS))
    return SceneMetadata(
        scene_id="street",
        source="street.usdz",
        cameras={"cam_a": cam_a},
        lidars=lidars,
        trajectory=None,
        tracks={},
        world_to_nre=np.eye(4),
        T_world_base=None,
        time_range_us=None,
        yaml={},
        members=(),
    )


def _windows(jobs, sensor):
    return [(j.start_us, j.end_us) for j in jobs if j.sensor == sensor]


def test_each_camera_walks_every_frame_step_th_frame(tmp_path):
    options = Options(output_dir=str(tmp_path), camera_id=("cam_a", "cam_b"), frame_step=3)
    plan = plan_jobs(options, _scene(), _answers())
    assert [s.id for s in plan.sensors] == ["cam_a", "cam_b"]
    assert [j.sensor for j in plan.jobs] == ["cam_a"] * 4 + ["cam_b"] * 4  # each camera's walk in turn
    # cam_a: its recorded exposures; cam_b (none in the file): the trajectory's poses, 1 µs long.
    assert _windows(plan.jobs, "cam_a") == [CAL_WINDOWS[i] for i in (0, 3, 6, 9)]
    assert _windows(plan.jobs, "cam_b") == [(RIG_TS[i], RIG_TS[i] + 1) for i in (0, 3, 6, 9)]
    assert [j.index for j in plan.jobs] == [0, 1, 2, 3] * 2
    job = plan.jobs[1]
    assert job.path == os.path.join(str(tmp_path), "cam_a", "330000.jpeg")  # --frame-naming: the end timestamp
    assert job.bev_path is None and not job.is_lidar
    req = job.request
    assert isinstance(req, sensorsim_pb2.RGBRenderRequest)
    assert (req.scene_id, req.resolution_h, req.resolution_w) == ("street", 300, 1)
    assert (req.frame_start_us, req.frame_end_us) == (300_000, 330_000)
    assert req.image_format == sensorsim_pb2.JPEG and req.image_quality == 95.0
    assert req.sensor_pose.start_pose.vec.x == pytest.approx(3.0) and req.sensor_pose.end_pose.vec.x == pytest.approx(
        3.3
    )
    assert not req.insert_ego_mask and not req.dynamic_objects
    cam_a = plan.sensors[0]
    assert (cam_a.kind, cam_a.directory, cam_a.unit) == ("camera", os.path.join(str(tmp_path), "cam_a"), "frame")
    assert cam_a.compiles == "533x300 images" and cam_a.why == "first request of this size"
    assert cam_a.fps == pytest.approx(1e6 / 300_000)  # frames 0.3 s apart


def test_max_frames_frame_naming_and_image_format(tmp_path):
    options = Options(
        output_dir=str(tmp_path),
        camera_id=("cam_b",),
        frame_step=2,
        max_frames=2,
        frame_naming="contiguous-output-index",
        image_format="png",
        height=36,
    )
    plan = plan_jobs(options, _scene(), _answers())
    assert [os.path.relpath(j.path, tmp_path) for j in plan.jobs] == [
        os.path.join("cam_b", "000000.png"),
        os.path.join("cam_b", "000001.png"),
    ]
    assert _windows(plan.jobs, "cam_b") == [(0, 1), (200_000, 200_001)]
    assert all(j.request.image_format == sensorsim_pb2.PNG and j.request.resolution_h == 36 for j in plan.jobs)
    assert plan.sensors[0].fps == pytest.approx(5.0)  # the rate of the stepped frames, before --max-frames


def test_shutter_ego_mask_and_demo_actors_go_into_the_requests(tmp_path):
    options = Options(
        output_dir=str(tmp_path),
        camera_id=("cam_a", "cam_b"),
        max_frames=1,
        disable_rolling_shutter=True,
        rig_name="hyperion",
        demo_actor_transform=True,
    )
    ts = np.asarray(RIG_TS, np.int64)
    tracks = [("7", ts, np.stack([np.eye(4)] * len(ts)))]
    plan = plan_jobs(options, _scene(), _answers(masks=[("hyperion", "cam_a")]), tracks)
    a, b = (j.request for j in plan.jobs)
    assert a.camera_intrinsics.shutter_type == sensorsim_pb2.GLOBAL
    assert (
        a.insert_ego_mask and a.ego_mask_id.rig_config_id == "hyperion" and a.ego_mask_id.camera_logical_id == "cam_a"
    )
    assert not b.insert_ego_mask  # the rig has no hood for cam_b
    assert [o.track_id for o in a.dynamic_objects] == ["7"]
    assert a.dynamic_objects[0].pose_pair.start_pose.vec.y == pytest.approx(2.0)  # 2 m to its left


def test_lidar_spins_follow_the_lidar_frame_step(tmp_path):
    options = Options(
        output_dir=str(tmp_path), camera_id=("cam_a",), max_frames=2, lidar=True, lidar_frame_step=4, lidar_type="AT128"
    )
    plan = plan_jobs(options, _scene(), _answers())
    assert [s.id for s in plan.sensors] == ["cam_a", "lidar_top"]
    lidar = plan.sensors[1]
    assert (lidar.kind, lidar.unit, lidar.fps) == ("lidar", "spin", None)
    assert lidar.compiles == "the AT128 lidar pass" and lidar.why == "first spin of this lidar type"
    spins = [j for j in plan.jobs if j.sensor == "lidar_top"]
    assert _windows(spins, "lidar_top") == [SPINS[0], SPINS[4]]  # every 4th spin, at most --max-frames
    assert spins[1].path == os.path.join(str(tmp_path), "lidar_top", "500000.ply")
    assert spins[1].bev_path == os.path.join(str(tmp_path), "lidar_top", "500000_bev.png") and spins[1].is_lidar
    req = spins[1].request
    assert isinstance(req, sensorsim_pb2.LidarRenderRequest)
    assert req.lidar_config.lidar_type == sensorsim_pb2.LidarDeviceType.Value("AT128")
    assert req.render_filter.raydrop_threshold == pytest.approx(0.5) and not req.render_filter.enable_distance_filter


def test_a_scene_without_a_lidar_mount_gets_a_roof_lidar(tmp_path):
    options = Options(output_dir=str(tmp_path), camera_id=(), lidar=True, frame_step=5, lidar_format="bin")
    plan = plan_jobs(options, _scene(lidar=False), _answers())
    assert [s.id for s in plan.sensors] == ["lidar"]
    # One 100 ms spin from each pose but the last, every 5th.
    assert _windows(plan.jobs, "lidar") == [(0, 100_000), (500_000, 600_000)]
    assert plan.jobs[0].path.endswith(os.path.join("lidar", "100000.bin"))
    assert plan.jobs[0].request.sensor_pose.start_pose.vec.z == pytest.approx(1.9)


def test_the_first_request_of_each_sensor_goes_first(tmp_path):
    options = Options(output_dir=str(tmp_path), camera_id=("cam_a", "cam_b"), max_frames=3, lidar=True)
    plan = plan_jobs(options, _scene(), _answers())
    firsts, rest = plan.firsts_and_rest()
    assert list(firsts) == ["cam_a", "cam_b", "lidar_top"]
    assert all(job.index == 0 and job.sensor == sensor for sensor, job in firsts.items())
    assert {k: [j.index for j in v] for k, v in rest.items()} == {"cam_a": [1, 2], "cam_b": [1, 2], "lidar_top": [1, 2]}


@pytest.mark.parametrize(
    "kw,answers,message",
    [
        (dict(camera_id=("cam_x",)), {}, "unknown camera(s) ['cam_x']; the scene has ['cam_a', 'cam_b']"),
        ({}, dict(trajectories=0), "the scene has no ego trajectory to walk"),
        (dict(lidar=True, lidar_id="nope"), {}, "the scene has no lidar 'nope' (['lidar_top'])"),
    ],
)
def test_what_the_scene_lacks_is_a_plan_error(tmp_path, kw, answers, message):
    options = Options(output_dir=str(tmp_path), **{"camera_id": ("cam_a",), **kw})
    with pytest.raises(PlanError) as info:
        plan_jobs(options, _scene(), _answers(**answers))
    assert str(info.value) == message


class _Refused(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "gone"


class _FakeStub:
    """Answers render_rgb / render_lidar at once, recording what it was sent; refuses `refuse`."""

    def __init__(self, refuse=()):
        self.sent = []
        self.refuse = refuse

    def _answer(self, req, reply, **kw):
        assert kw == dict(metadata=(("x-nre-scene-id", "street"),), timeout=5.0, wait_for_ready=True)
        self.sent.append((req.frame_start_us, type(req).__name__))
        if req.frame_start_us in self.refuse:
            raise _Refused()
        return reply

    def render_rgb(self, req, **kw):
        return self._answer(req, sensorsim_pb2.RGBRenderReturn(image_bytes=b"img"), **kw)

    def render_lidar(self, req, **kw):
        return self._answer(req, sensorsim_pb2.LidarRenderReturn(), **kw)


def test_run_jobs_sends_firsts_first_and_counts_failures(tmp_path, capsys):
    options = Options(output_dir=str(tmp_path), camera_id=("cam_a", "cam_b"), max_frames=3, lidar=True)
    plan = plan_jobs(options, _scene(), _answers())
    stub, saved = _FakeStub(refuse={200_000}), []
    results = run_jobs(
        stub,
        plan,
        save=lambda job, reply: saved.append((job, reply)),
        metadata=(("x-nre-scene-id", "street"),),
        timeout=5.0,
        workers=1,
        bar=False,
    )
    assert stub.sent[:3] == [(0, "RGBRenderRequest"), (0, "RGBRenderRequest"), (0, "LidarRenderRequest")]
    assert len(stub.sent) == len(plan.jobs) == 9
    assert all(os.path.isdir(s.directory) for s in plan.sensors)
    assert results.failures == 3  # the third frame of each camera and the third spin start at 0.2 s
    assert {k: [j.index for j in v] for k, v in results.written.items()} == {
        "cam_a": [0, 1],
        "cam_b": [0, 1],
        "lidar_top": [0, 1],
    }
    assert all(reply.image_bytes == b"img" for job, reply in saved if not job.is_lidar)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "cam_a: compiling 533x300 images on the server unless it already has (first request of this size)"
    assert "render-grpc: cam_a frame 3/3: UNAVAILABLE: gone" in err
    assert "lidar_top: first spin in " in "\n".join(err) and "[9/9]" in "\n".join(err)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (value, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_write_outputs_from_fake_image_bytes(tmp_path, capsys):
    options = Options(output_dir=str(tmp_path), camera_id=("cam_a", "cam_b"), frame_step=3, image_format="png")
    plan = plan_jobs(options, _scene(), _answers())
    for sensor in plan.sensors:
        os.makedirs(sensor.directory)
    cam_a = [j for j in plan.jobs if j.sensor == "cam_a"][:3]
    for i, job in enumerate(cam_a):
        render_jobs.save_reply(job, sensorsim_pb2.RGBRenderReturn(image_bytes=_png(40 * i)))
    results = Results({"cam_a": tuple(cam_a), "cam_b": ()}, failures=1, seconds=2.0)
    write_outputs(plan, results, video_format=("gif",), args={"height": 300})
    assert sorted(os.listdir(tmp_path / "cam_a")) == ["30000.png", "330000.png", "630000.png"]
    with Image.open(tmp_path / "cam_a.gif") as gif:  # at the recorded rate: frames 0.3 s apart
        assert [f.info["duration"] for f in ImageSequence.Iterator(gif)] == [300] * 3
    assert not (tmp_path / "cam_b.gif").exists()  # no frames, no animation
    stamps = json.loads((tmp_path / "timestamps.json").read_text())
    assert list(stamps) == ["cam_a", "cam_b"] and stamps["cam_b"] == []
    assert stamps["cam_a"][1] == {"file": "330000.png", "frame_start_us": 300_000, "frame_end_us": 330_000}
    assert json.loads((tmp_path / "render_grpc_cli_args.json").read_text()) == {"height": 300}
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'cam_a'}.gif  (3 frames at 3.33 fps)",
        f"render-grpc: 3 image(s) / spin(s) in {tmp_path} (2.0 s, 1 failed)",
    ]


def test_save_reply_writes_a_lidar_spin_as_bin_and_bev(tmp_path):
    options = Options(output_dir=str(tmp_path), camera_id=(), lidar=True, max_frames=1, lidar_format="bin")
    (job,) = plan_jobs(options, _scene(), _answers()).jobs
    os.makedirs(os.path.dirname(job.path))
    pts = np.asarray([[1, 2, 0.5], [3, -1, 1.0]], "<f4")
    reply = sensorsim_pb2.LidarRenderReturn(
        point_xyzs_buffer=pts.tobytes(), point_intensities_buffer=np.asarray([0.25, 0.75], "<f4").tobytes()
    )
    render_jobs.save_reply(job, reply, bev_color="intensity")
    np.testing.assert_array_equal(np.fromfile(job.path, "<f4").reshape(-1, 4)[:, :3], pts)
    with Image.open(job.bev_path) as im:
        assert im.format == "PNG"
