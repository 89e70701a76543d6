"""Scene discovery, request-time registration (x-nre-scene-url / -id) and the download cache."""

import os
import shutil

import pytest

from nurec_jax.server.downloads import DownloadCache, DownloadError, parse_scene_url
from nurec_jax.server.errors import InvalidArgument, NotFound
from nurec_jax.server.registry import SceneRegistry, discover_artifacts


def test_discovery(tmp_path, thin_scene):
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(thin_scene, tmp_path / "a" / "b" / "x.usdz")
    (tmp_path / "a" / "broken.usdz").write_bytes(b"not a zip")
    found, broken = discover_artifacts(str(tmp_path / "**" / "*.usdz"))
    assert list(found) == ["thin-street"]
    assert list(broken) == [str(tmp_path / "a" / "broken.usdz")] and "zip" in next(iter(broken.values()))
    shutil.copy(thin_scene, tmp_path / "a" / "y.usdz")
    with pytest.raises(ValueError, match="'thin-street' is used by two artifacts"):
        discover_artifacts(str(tmp_path / "**" / "*.usdz"))
    with pytest.raises(ValueError, match="must end in .usdz"):
        discover_artifacts(str(tmp_path / "**" / "*"))


def test_local_registration(tmp_path, thin_scene):
    reg = SceneRegistry({}, DownloadCache(str(tmp_path / "dl")))
    with pytest.raises(NotFound, match="unknown scene 'mine'"):
        reg.metadata("mine")
    reg.register("mine", "file://" + thin_scene)
    assert reg.ids() == ["mine"]
    meta = reg.metadata("mine")
    assert meta.scene_id == "mine" and "camera_front_wide_120fov" in meta.cameras
    reg.register("mine", thin_scene)  # same file, bare path: no-op
    other = tmp_path / "other.usdz"
    shutil.copy(thin_scene, other)
    with pytest.raises(InvalidArgument, match="already registered"):
        reg.register("mine", str(other))
    with pytest.raises(InvalidArgument, match="Invalid scene ID"):
        reg.register("bad/id", str(other))
    with pytest.raises(InvalidArgument, match="unsupported URL scheme 'ftp'"):
        reg.register("x", "ftp://host/a.usdz")
    with pytest.raises(InvalidArgument, match="no such file"):
        reg.register("x", "file:///does/not/exist.usdz")
    junk = tmp_path / "junk.usdz"
    junk.write_bytes(b"junk")
    with pytest.raises(InvalidArgument, match="Failed to register local scene"):
        reg.register("x", str(junk))
    assert reg.ids() == ["mine"]


def test_parse_scene_url():
    assert parse_scene_url("/abs/a.usdz") == ("local", "/abs/a.usdz")
    assert parse_scene_url("file:///abs/a%20b.usdz") == ("local", "/abs/a b.usdz")
    assert parse_scene_url("https://h/a.usdz")[0] == "remote"
    for bad in ("relative/a.usdz", "s3://b/a.usdz", "file://otherhost/a.usdz", "http:///a.usdz"):
        with pytest.raises(DownloadError):
            parse_scene_url(bad)


def test_downloads_lru_and_failures(tmp_path, thin_scene, http_dir):
    www, base = http_dir
    for name in ("s1", "s2", "s3"):
        shutil.copy(thin_scene, www / f"{name}.usdz")
    (www / "junk.usdz").write_bytes(b"x" * 1000)
    dl_dir = tmp_path / "dl"
    reg = SceneRegistry({}, DownloadCache(str(dl_dir), max_files=2))
    dropped = []
    reg.on_unregister = dropped.append
    reg.register("s1", f"{base}/s1.usdz")
    reg.register("s2", f"{base}/s2.usdz")
    assert reg.metadata("s1").scene_id == "s1"  # touch s1: s2 is now least recently used
    reg.register("s3", f"{base}/s3.usdz")
    assert reg.ids() == ["s1", "s3"] and dropped == ["s2"]
    assert sorted(os.listdir(dl_dir)) == ["s1.usdz", "s3.usdz"]
    # Failures leave nothing behind and register nothing.
    with pytest.raises(InvalidArgument, match="Failed to download scene .* 404"):
        reg.register("s4", f"{base}/missing.usdz")
    with pytest.raises(InvalidArgument, match="not a .usdz"):
        reg.register("s4", f"{base}/junk.usdz")
    small = SceneRegistry({}, DownloadCache(str(dl_dir), max_files=2, max_bytes=500))
    with pytest.raises(InvalidArgument, match="above the limit of 500"):
        small.register("s5", f"{base}/junk.usdz")
    assert sorted(os.listdir(dl_dir)) == ["s1.usdz", "s3.usdz"]
    assert reg.ids() == ["s1", "s3"]
