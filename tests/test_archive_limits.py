"""Zip and gzip bombs, oversized side files and deep nesting: refused with a SceneFormatError naming the
member and the limit, without inflating past the limit, and leaving no memory behind even while the
error is kept (a server keeps a failed load's error, and its traceback, for a while)."""

from __future__ import annotations

import gc
import gzip
import io
import os
import tracemalloc
import zipfile

import pytest

from nurec_jax import scene
from nurec_jax.archive import Archive
from nurec_jax.errors import SceneFormatError

MiB = 1 << 20


def _zip(path, members, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _gzip_bomb(n: int) -> bytes:
    return gzip.compress(b"\0" * n, compresslevel=9)


class _Traced:
    """tracemalloc around a block, with the cyclic collector off (as if it had not run yet)."""

    def __enter__(self):
        gc.collect()
        gc.disable()
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.current, self.peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        gc.enable()


def test_a_zip_bomb_is_refused_before_it_inflates(tmp_path):
    p = _zip(tmp_path / "bomb.usdz", {"payload.nurec": b"\0" * (24 * MiB)})  # ~24 KB on disk
    with _Traced() as t, Archive(p, 1 << 30) as a:
        with pytest.raises(SceneFormatError, match=r"bomb\.usdz:payload\.nurec: inflates \d+:1 .*200:1"):
            a.read("payload.nurec")
    assert t.peak < 2 * MiB  # the header's claim was enough


def test_ordinary_members_pass_and_small_ones_are_never_ratio_checked(tmp_path):
    data = os.urandom(3 * MiB) * 2  # compresses ~2:1
    p = _zip(tmp_path / "ok.usdz", {"a.bin": data, "zeros.json": b" " * MiB})  # the second ~1000:1, but small
    with Archive(p, 1 << 30) as a:
        assert a.read("a.bin") == data
        assert len(a.read("zeros.json")) == MiB


def test_member_and_total_limits(tmp_path):
    p = _zip(tmp_path / "t.usdz", {"a": b"x" * 600_000, "b": b"y" * 600_000}, zipfile.ZIP_STORED)
    with Archive(p, 500_000) as a:
        with pytest.raises(SceneFormatError, match=r"t\.usdz:a: 600000 bytes exceeds the limit of 500000 bytes"):
            a.read("a")
    with Archive(p, MiB, max_total_bytes=1_000_000) as a:
        a.read("a")
        with pytest.raises(SceneFormatError, match=r"t\.usdz:b: .*total limit of 1000000"):
            a.read("b")


def test_a_corrupt_member_drops_what_it_inflated(tmp_path):
    data = os.urandom(8 * MiB)
    p = _zip(tmp_path / "c.usdz", {"big.bin": data}, zipfile.ZIP_STORED)
    raw = bytearray(p.read_bytes())
    raw[raw.find(data[:64]) + len(data) - 1] ^= 0xFF  # last byte: the CRC check fails at the very end
    p.write_bytes(bytes(raw))
    del raw, data
    kept = []
    with _Traced() as t:
        with Archive(p) as a:
            try:
                a.read("big.bin")
            except SceneFormatError as e:
                kept.append(e)
    assert kept and "c.usdz:big.bin: corrupt" in str(kept[0])
    assert t.peak > 8 * MiB  # it did inflate the whole member...
    assert t.current < MiB, t.current  # ... and the kept error holds none of it


def test_a_gzip_bomb_in_the_payload_is_stopped_while_streaming_and_memory_returns(tmp_path):
    bomb = _gzip_bomb(64 * MiB)  # ~64 KB, 1000:1
    p = _zip(tmp_path / "gz.usdz", {"volume.nurec": bomb}, zipfile.ZIP_STORED)
    opts = scene.LoadOptions(ratio_floor_bytes=4 * MiB)
    kept = []
    with _Traced() as t:
        for _ in range(3):
            try:
                scene.load_host_scene(p, opts)
            except SceneFormatError as e:
                kept.append(e)
    assert len(kept) == 3
    assert "gz.usdz:volume.nurec" in str(kept[0]) and "200:1" in str(kept[0]), kept[0]
    # Stopped at ~200x its 64 KB (13 MB), not at its 64 MiB; nothing held afterwards.
    assert t.peak < 32 * MiB, t.peak
    assert t.current < 2 * MiB, t.current


def test_the_payload_size_limit_applies_without_the_ratio(tmp_path):
    p = _zip(tmp_path / "gz.usdz", {"volume.nurec": _gzip_bomb(8 * MiB)}, zipfile.ZIP_STORED)
    opts = scene.LoadOptions(max_payload_bytes=2 * MiB, max_inflation_ratio=None)
    with pytest.raises(SceneFormatError, match=r"gz\.usdz:volume\.nurec: .*limit of 2097152 bytes"):
        scene.load_host_scene(p, opts)


def test_a_checkpoint_whose_inner_zip_is_a_bomb_is_refused(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", b"\0" * (32 * MiB))
    p = _zip(tmp_path / "ck.usdz", {"checkpoint.ckpt": inner.getvalue()}, zipfile.ZIP_STORED)
    with _Traced() as t:
        with pytest.raises(SceneFormatError, match=r"ck\.usdz:checkpoint\.ckpt: member 'archive/data/0' .*200:1"):
            scene.load_host_scene(p)
    assert t.peak < 4 * MiB


def test_side_files_are_bounded_before_parsing(tmp_path):
    p = _zip(tmp_path / "big.usdz", {"rig_trajectories.json": b'"' + b"a" * (2 * MiB) + b'"'})
    opts = scene.LoadOptions(max_side_file_bytes=MiB, max_inflation_ratio=None)
    with pytest.raises(SceneFormatError, match=r"big\.usdz:rig_trajectories\.json: .*1048576"):
        scene.read_scene_metadata(p, opts)
    p = _zip(tmp_path / "y.usdz", {"metadata.yaml": b"a: '" + b"b" * (2 * MiB) + b"'\n"})
    with pytest.raises(SceneFormatError, match=r"y\.usdz:metadata\.yaml: .*1048576"):
        scene.read_scene_metadata(p, scene.LoadOptions(max_yaml_bytes=MiB))


def test_deep_nesting_is_a_format_error(tmp_path):
    p = _zip(tmp_path / "deep.usdz", {"sequence_tracks.json": b"[" * 200_000 + b"]" * 200_000})
    with pytest.raises(SceneFormatError, match=r"deep\.usdz:sequence_tracks\.json: JSON nests too deeply"):
        scene.read_scene_metadata(p)
    p = _zip(tmp_path / "deepy.usdz", {"metadata.yaml": b"a: " + b"[" * 50_000 + b"]" * 50_000})
    with pytest.raises(SceneFormatError, match=r"deepy\.usdz:metadata\.yaml: YAML nests too deeply"):
        scene.read_scene_metadata(p)


def test_load_options_defaults_fit_real_scenes():
    o = scene.LoadOptions()
    # Payloads of 0.35-0.6 GB and checkpoints of ~1.1 GB load; a payload plus a checkpoint fit the total.
    assert o.max_payload_bytes >= 1200 * MiB and o.max_member_bytes >= 1200 * MiB
    assert o.max_total_bytes >= 2 * o.max_payload_bytes
    assert o.max_payload_bytes < 8 << 30
    assert o.max_side_file_bytes >= 32 * MiB  # rig_trajectories.json of long clips: tens of MB
