"""Scene discovery, request-time registration (x-nre-scene-url / -id) and the download cache."""

import os
import shutil

import pytest

from nurec_jax.server.download_cache import DownloadCache, parse_scene_url
from nurec_jax.server.downloads import DestinationPolicy, DownloadError
from nurec_jax.server.registry import SceneRegistry, discover_artifacts
from nurec_jax.server.request_errors import InvalidArgument, NotFound


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


def test_local_paths_are_refused(tmp_path, thin_scene):
    """A request never names a file on the server's disk, and the answer does not depend on whether it exists."""
    reg = SceneRegistry({}, DownloadCache(str(tmp_path / "dl")))
    with pytest.raises(NotFound, match="unknown scene 'mine'"):
        reg.metadata("mine")
    messages = set()
    for url in (
        "file://" + thin_scene,
        thin_scene,
        "file:///does/not/exist.usdz",
        "/does/not/exist.usdz",
        "relative/a.usdz",
    ):
        with pytest.raises(InvalidArgument, match="^x-nre-scene-url: local paths are not accepted") as info:
            reg.register("mine", url)
        messages.add(str(info.value))
    assert len(messages) == 1  # the same text for existing and missing files
    with pytest.raises(InvalidArgument, match="Invalid scene ID"):
        reg.register("bad/id", "http://example.com/a.usdz")
    with pytest.raises(InvalidArgument, match="unsupported URL scheme 'ftp'"):
        reg.register("x", "ftp://host/a.usdz")
    assert reg.ids() == []


def test_parse_scene_url():
    assert parse_scene_url("https://h/a.usdz") == "https://h/a.usdz"
    assert parse_scene_url("HTTP://h:8080/a.usdz") == "HTTP://h:8080/a.usdz"
    for bad in (
        "/abs/a.usdz",
        "file:///abs/a.usdz",
        "relative/a.usdz",
        "s3://b/a.usdz",
        "file://otherhost/a.usdz",
        "http:///a.usdz",
        "http://h:99999/a.usdz",
    ):
        with pytest.raises(DownloadError):
            parse_scene_url(bad)


def test_downloads_lru_and_failures(tmp_path, thin_scene, http_dir):
    www, base = http_dir
    for name in ("s1", "s2", "s3"):
        shutil.copy(thin_scene, www / f"{name}.usdz")
    (www / "junk.usdz").write_bytes(b"x" * 1000)
    dl_dir = tmp_path / "dl"
    loopback = DestinationPolicy(allow_private=True)  # the test server is on 127.0.0.1
    reg = SceneRegistry({}, DownloadCache(str(dl_dir), max_files=2, policy=loopback))
    dropped = []
    reg.on_unregister = dropped.append
    reg.register("s1", f"{base}/s1.usdz")
    reg.register("s2", f"{base}/s2.usdz")
    assert reg.metadata("s1").scene_id == "s1"  # touch s1: s2 is now least recently used
    reg.register("s3", f"{base}/s3.usdz")
    assert reg.ids() == ["s1", "s3"] and dropped == ["s2"]
    assert sorted(os.listdir(dl_dir)) == [".lock", "index.json", "s1.usdz", "s3.usdz"]
    # Failures leave nothing behind and register nothing.
    with pytest.raises(DownloadError, match="Failed to download scene .* 404"):
        reg.register("s4", f"{base}/missing.usdz")
    with pytest.raises(DownloadError, match="not a .usdz"):
        reg.register("s4", f"{base}/junk.usdz")
    small = SceneRegistry({}, DownloadCache(str(dl_dir / "small"), max_files=2, max_bytes=500, policy=loopback))
    with pytest.raises(DownloadError, match="above the limit of 500"):
        small.register("s5", f"{base}/junk.usdz")
    assert sorted(os.listdir(dl_dir)) == [".lock", "index.json", "s1.usdz", "s3.usdz", "small"]
    assert reg.ids() == ["s1", "s3"]
