"""PLY / BEV output of lidar spins, the lidar reply encoding, and lidar intensity from scene files."""

import numpy as np

from nurec_jax import data, load_host_scene, pointcloud
from nurec_jax.server import convert


def test_ply_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(100, 3)).astype(np.float32)
    inten = rng.uniform(size=100).astype(np.float32)
    rings = rng.integers(0, 128, 100).astype(np.uint16)
    path = str(tmp_path / "spin.ply")
    pointcloud.write_ply(path, pts, inten, rings)
    back = pointcloud.read_ply_points(path)
    np.testing.assert_array_equal(np.stack([back["x"], back["y"], back["z"]], 1), pts)
    np.testing.assert_array_equal(back["intensity"], inten)
    np.testing.assert_array_equal(back["ring"], rings)
    assert open(path, "rb").read(60).startswith(b"ply\nformat binary_little_endian 1.0\nelement vertex 100\n")


def test_bev_places_points():
    pts = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 1.0]])  # 10 m ahead; 10 m to the left
    img = pointcloud.bev_image(pts, range_m=20.0, size=100)
    assert img.shape == (100, 100, 3)
    assert img[25, 50].any() and img[50, 25].any()  # ahead = up, left = left
    assert img[50, 50].all()  # the sensor marker


def test_lidar_reply_encoding():
    pts = np.arange(12, dtype=np.float32).reshape(4, 3)
    inten = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    rings = np.array([0, 5, 127, 3], np.uint16)
    r = convert.lidar_return(pts, inten, rings)
    assert r.num_points == 4
    assert r.point_xyzs_buffer == pts.astype("<f4").tobytes()
    assert r.point_intensities_buffer == inten.astype("<f4").tobytes()
    assert r.point_ring_ids_buffer == rings.astype("<u2").tobytes()
    assert list(r.point_xyzs) == pts.reshape(-1).tolist() and list(r.point_ring_ids) == [0, 5, 127, 3]
    lean = convert.lidar_return(pts, inten, rings, repeated_fields=False)
    assert lean.point_xyzs_buffer == r.point_xyzs_buffer and len(lean.point_xyzs) == 0
    assert lean.ByteSize() < r.ByteSize()


def test_scene_lidar_intensity_is_loaded():
    host = load_host_scene(data.sample_scene_path())
    for layer in host.static_layers + host.rigid_layers:
        assert layer.lidar_intensity is not None and layer.lidar_intensity.shape == (layer.count,)
        assert 0.1 <= layer.lidar_intensity.min() and layer.lidar_intensity.max() <= 0.61
