"""Poses of cameras and actors taken from a scene's recorded trajectory and tracks."""

import numpy as np

import nurec_jax
from nurec_jax import renderer

META = nurec_jax.read_scene_metadata(nurec_jax.sample_scene_path())
TRACK_IDS = ("7", "3", "30", "21", "15", "12", "42")  # the sample's rigid-layer order


def test_actor_outside_its_track_time_range_is_hidden():
    t0 = int(META.trajectory.timestamps_us[0])
    early = renderer.track_actor_poses(META, TRACK_IDS, t0, t0 + 30_000)
    late = renderer.track_actor_poses(META, TRACK_IDS, t0 + 6_000_000, t0 + 6_030_000)
    i = TRACK_IDS.index("21")  # its track starts 4 s into the clip
    assert not bool(early.visible[i]) and bool(late.visible[i])
    assert bool(early.visible[TRACK_IDS.index("7")])
    want = META.tracks["21"].pose_at(t0 + 6_030_000)
    np.testing.assert_allclose(np.asarray(late.poses.end.as_matrix())[i], want, atol=1e-5)


def test_unknown_track_is_hidden_and_override_shows_it():
    t0 = int(META.trajectory.timestamps_us[0])
    pose = np.eye(4)
    pose[:3, 3] = [5.0, 1.0, 0.7]
    a = renderer.track_actor_poses(META, ("nope", "3"), t0, t0 + 1)
    assert not bool(a.visible[0]) and bool(a.visible[1])
    b = renderer.track_actor_poses(META, ("nope",), t0, t0 + 1, overrides={"nope": (pose, pose)})
    assert bool(b.visible[0])
    np.testing.assert_allclose(np.asarray(b.poses.start.trans)[0], [5.0, 1.0, 0.7])


def test_camera_pose_is_rig_pose_times_extrinsics():
    cal = META.cameras["camera_front_wide_120fov"]
    s, e = (int(x) for x in cal.frame_timestamps_us[10])
    pair = renderer.rig_camera_poses(META, cal.logical_id, s, e)
    np.testing.assert_allclose(
        np.asarray(pair.start.as_matrix()), META.trajectory.pose_at(s) @ cal.T_sensor_rig, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(pair.end.as_matrix()), META.trajectory.pose_at(e) @ cal.T_sensor_rig, atol=1e-5
    )
