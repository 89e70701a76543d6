"""nurec_jax.torch_checkpoint: reading torch.save checkpoints with no torch and no code execution.

The fixtures in tests/data/checkpoints/ were written by real PyTorch 2.13 with
tools/make_checkpoint_fixtures.py; everything else here is written by tools/torch_zip.py.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from nurec_jax.errors import SceneFormatError, UnsupportedSceneError
from nurec_jax.torch_checkpoint import (
    InertObject,
    LazyTensor,
    UnsafeCheckpointError,
    load_checkpoint,
    state_dict_arrays,
)
from tools import torch_zip

DATA = os.path.join(os.path.dirname(__file__), "data", "checkpoints")
LIMIT = 1 << 26
BG = "model.gaussians_nodes.background"


def _load(source, limit: int = LIMIT):
    return load_checkpoint(source, where="test.ckpt", max_member_bytes=limit)


def _tensors(obj, path: str = "") -> dict[str, LazyTensor]:
    out: dict[str, LazyTensor] = {}
    if isinstance(obj, LazyTensor):
        out[path] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{path}/{k}" if path else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{path}/{i}"))
    return out


def _ckpt_bytes(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch_zip.write_checkpoint(buf, obj, **kw)
    return buf.getvalue()


def _archive_bytes(data_pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    torch_zip.write_archive(buf, data_pkl, storages or {})
    return buf.getvalue()


# --- the fixtures written by real torch ----------------------------------------------------------


def test_lightning_like_matches_expected():
    ckpt = _load(os.path.join(DATA, "lightning_like.ckpt"))
    expected = np.load(os.path.join(DATA, "expected.npz"))
    got = _tensors(ckpt)
    assert sorted(got) == sorted(expected.files)
    for key in expected.files:
        a, want = got[key].numpy(), expected[key]
        assert a.dtype == want.dtype, key
        assert a.shape == want.shape, key
        assert np.array_equal(a, want), key
        assert a.flags.writeable and a.flags.c_contiguous
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 1200
    assert ckpt["pytorch-lightning_version"] == "2.4.0"
    assert ckpt["hyper_parameters"] == {}
    sd = ckpt["state_dict"]
    assert isinstance(sd, OrderedDict)
    assert sd["model._extra_state"] == {"obj_track_ids": {"dynamic_rigids": ["7@seq", "9@seq"]}}
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["params"] == [0, 1]
    assert sd["model.aux.param"].is_parameter and not sd[f"{BG}.positions"].is_parameter
    assert sd["model.aux.bf16"].dtype == "bfloat16" and sd["model.aux.bf16"].numpy().dtype == np.float32
    assert sd["model.aux.half"].numpy().dtype == np.float16
    assert sd["model.aux.scalar"].shape == () and sd[f"{BG}.n_active_features"].numpy().dtype == np.int64
    assert sd["model.aux.transposed"].stride == (1, 7)
    assert sd["model.aux.sliced"].storage_offset == 14
    assert sd["model.aux.expanded"].stride == (0, 1)
    assert sd["model.aux.tagged"].attributes == {"tag": "python attribute"}
    assert not sd["model.aux.tagged"].is_parameter
    assert sd["model.aux.tagged_param"].is_parameter
    assert sd["model.aux.tagged_param"].attributes == {"tag": 7}
    assert ckpt["misc"] == {"size": (2, 3), "device": "cpu", "raw": b"ab", "ids": {1, 2}}


def test_shared_storage_is_read_once():
    sd = state_dict_arrays(_load(os.path.join(DATA, "lightning_like.ckpt")))
    a, b = sd["model.aux.shared_a"], sd["model.aux.shared_b"]
    assert a.storage is b.storage and a.storage.reads == 0
    assert b.storage_offset == 6
    joined = np.concatenate([a.numpy().ravel(), b.numpy()])
    assert a.storage.reads == 1
    assert np.array_equal(joined, np.frombuffer(a.storage.raw(), "<f4"))
    assert sd["model.aux.sliced"].storage is sd["model.aux.transposed"].storage


def test_state_dict_arrays_prefix():
    ckpt = _load(os.path.join(DATA, "lightning_like.ckpt"))
    bg = state_dict_arrays(ckpt, f"{BG}.")
    assert set(bg) == {
        "positions",
        "rotations",
        "scales",
        "densities",
        "features_albedo",
        "features_specular",
        "n_active_features",
    }
    assert bg["features_specular"].shape == (40, 45)
    flat = state_dict_arrays(ckpt["state_dict"])
    assert flat.keys() == ckpt["state_dict"].keys()
    with pytest.raises(SceneFormatError):
        state_dict_arrays([1, 2])


def test_malicious_fixture_is_refused_unexecuted():
    marker = "/tmp/nurec_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        _load(os.path.join(DATA, "malicious.ckpt"))
    msg = str(e.value)
    assert "posix.system" in msg or "os.system" in msg
    assert "not executed" in msg and msg.startswith("test.ckpt:")
    assert not os.path.exists(marker)


def test_omegaconf_and_numpy_become_inert_placeholders():
    ckpt = _load(os.path.join(DATA, "omegaconf_hparams.ckpt"))
    assert np.array_equal(ckpt["state_dict"]["w"].numpy(), np.ones(2, np.float32))
    hp = ckpt["hyper_parameters"]
    assert isinstance(hp, InertObject) and hp.qualname == "omegaconf.dictconfig.DictConfig"
    assert isinstance(hp.state, dict) and "_content" in hp.state
    assert isinstance(ckpt["dirpath"], InertObject) and ckpt["dirpath"].args == ("/", "runs", "a")
    score = ckpt["score"]
    assert isinstance(score, InertObject) and score.qualname == "numpy._core.multiarray.scalar"


# --- hand-built hostile pickles ------------------------------------------------------------------


class _Reduces:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    "func,args,name",
    [
        (eval, ("__import__('os').system('touch /tmp/nurec_pwned_eval')",), "builtins.eval"),
        (subprocess.Popen, (["touch", "/tmp/nurec_pwned_popen"],), "subprocess.Popen"),
    ],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_hostile_globals_are_refused(func, args, name, protocol):
    pkl = pickle.dumps({"state_dict": {"w": _Reduces(func, args)}}, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match=name.replace(".", r"\.")):
        _load(_archive_bytes(pkl))
    assert not os.path.exists("/tmp/nurec_pwned_eval") and not os.path.exists("/tmp/nurec_pwned_popen")


class _PersistentPickler(pickle.Pickler):
    def __init__(self, f, pid):
        super().__init__(f, protocol=2)
        self._pid = pid

    def persistent_id(self, obj):
        return self._pid if isinstance(obj, _Reduces) else None


@pytest.mark.parametrize(
    "pid",
    [
        ("evil", 1),
        "storage",
        ("storage", "FloatStorage", "0", "cpu", 1),
        ("storage", None, "../x", "cpu", 1),
    ],
)
def test_unknown_persistent_ids_are_refused(pid):
    buf = io.BytesIO()
    _PersistentPickler(buf, pid).dump({"w": _Reduces(print, ())})
    with pytest.raises(SceneFormatError, match="persistent id|storage reference|refused"):
        _load(_archive_bytes(buf.getvalue()))


def test_calling_a_storage_class_is_refused():
    with pytest.raises(UnsafeCheckpointError, match="FloatStorage"):
        _load(_archive_bytes(b"\x80\x02ctorch\nFloatStorage\n)R."))


def test_rebuild_helper_with_forged_arguments_is_refused():
    # _rebuild_tensor_v2 applied to a string instead of a storage reference.
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(X\x01\x00\x00\x00xK\x00))\x89}tR."
    with pytest.raises(SceneFormatError, match="storage reference"):
        _load(_archive_bytes(pkl))


# --- malformed files -----------------------------------------------------------------------------


def test_short_storage_member_is_refused():
    data_pkl, storages = torch_zip.dumps({"w": np.arange(8, dtype=np.float32)})
    storages["0"] = storages["0"][:-4]
    with pytest.raises(SceneFormatError, match=r"archive/data/0 holds 28 bytes, expected 32"):
        _load(_archive_bytes(data_pkl, storages))


def test_missing_storage_member_is_refused():
    data_pkl, _ = torch_zip.dumps({"w": np.arange(8, dtype=np.float32)})
    with pytest.raises(SceneFormatError, match="missing"):
        _load(_archive_bytes(data_pkl, {}))


@pytest.mark.parametrize(
    "shape,stride,offset",
    [((3, 3), (3, 1), 0), ((2,), (1,), 5), ((6,), (1,), 6), ((2, 2), (5, 1), 0)],
)
def test_views_outside_the_storage_are_refused(shape, stride, offset):
    view = torch_zip.TensorView(np.arange(6, dtype=np.float32), shape, stride, offset)
    with pytest.raises(SceneFormatError, match=r"data/0.*outside the storage"):
        _load(_ckpt_bytes({"state_dict": {"w": view}}))


def test_expansion_beyond_the_limit_is_refused():
    view = torch_zip.TensorView(np.zeros(1, np.float32), (1 << 30,), (0,), 0)
    with pytest.raises(SceneFormatError, match="exceeds the limit"):
        _load(_ckpt_bytes({"w": view}))


def test_member_over_the_limit_is_refused():
    with pytest.raises(SceneFormatError, match="over the limit"):
        _load(_ckpt_bytes({"w": np.zeros(1000, np.float64)}), limit=4000)


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"\x80\x02}q\x00.", "not a zip"),  # the legacy (pre-1.6) pickle format
        (b"PK\x03\x04 truncated", "not a zip"),
    ],
)
def test_not_a_zip(raw, match):
    with pytest.raises(SceneFormatError, match=f"test.ckpt: {match}"):
        _load(raw)


def test_zip_without_data_pkl():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/version", b"3\n")
    with pytest.raises(SceneFormatError, match="data.pkl"):
        _load(buf.getvalue())


@pytest.mark.parametrize("pkl", [b"\x80\x02}q\x00(X\x01", b"garbage", b"\x80\x02K\x01R."])
def test_bad_pickle(pkl):
    with pytest.raises(SceneFormatError, match="test.ckpt: data.pkl"):
        _load(_archive_bytes(pkl))


def test_bad_byteorder():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/data.pkl", b"\x80\x02N.")
        zf.writestr("a/byteorder", b"middle")
    with pytest.raises(SceneFormatError, match="byteorder"):
        _load(buf.getvalue())


def test_unsupported_dtype():
    # A complex64 storage is recognised but not converted.
    pkl = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nComplexFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00K\x01\x85K\x01\x85\x89}tR."
    )
    with pytest.raises(UnsupportedSceneError, match="complex64"):
        _load(_archive_bytes(pkl, {"0": bytes(8)}))


# --- round trips through tools/torch_zip.py ------------------------------------------------------


def _roundtrip_obj():
    base = np.arange(24, dtype=np.float32)
    return {
        "epoch": 7,
        "big": -(2**70),
        "name": "ünïcode",
        "raw": b"\x00\xff",
        "empty": b"",
        "nested": [1, 2.5, None, True, (1, 2, 3, 4, 5)],
        "state_dict": OrderedDict(
            f32=np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32),
            f16=np.array([1.5, -2.0, 65504.0], np.float16),
            f64=np.array([np.pi]),
            i8=np.array([-128, 127], np.int8),
            i16=np.array([-3, 3], np.int16),
            i32=np.array([[1, 2], [3, 4]], np.int32),
            i64=np.array(2**40, np.int64),
            u8=np.array([0, 255], np.uint8),
            u16=np.array([0, 65535], np.uint16),
            u32=np.array([2**32 - 1], np.uint32),
            u64=np.array([2**64 - 1], np.uint64),
            b=np.array([[True, False], [False, True]]),
            empty=np.zeros((0, 4), np.float32),
            fortran=np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
            view_t=torch_zip.TensorView(base, (4, 6), (1, 4), 0),
            view_off=torch_zip.TensorView(base, (2, 3), (3, 1), 10),
            param=torch_zip.Parameter(np.ones((2, 2), np.float32)),
            extra={"obj_track_ids": {"dynamic_rigids": ["7@seq"]}},
        ),
    }


def _expected_array(v):
    if isinstance(v, torch_zip.Parameter):
        v = v.data
    if isinstance(v, torch_zip.TensorView):
        item = v.storage.itemsize
        return np.lib.stride_tricks.as_strided(v.storage[v.offset :], v.shape, tuple(s * item for s in v.stride)).copy()
    return v


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_roundtrip(byteorder):
    obj = _roundtrip_obj()
    got = _load(_ckpt_bytes(obj, byteorder=byteorder, archive_name="some_name"))
    assert set(got) == set(obj)
    for k in ("epoch", "big", "name", "raw", "empty", "nested"):
        assert got[k] == obj[k] and type(got[k]) is type(obj[k])
    sd, want = got["state_dict"], obj["state_dict"]
    assert isinstance(sd, OrderedDict) and list(sd) == list(want)
    assert sd["extra"] == want["extra"]
    for k, v in want.items():
        if k == "extra":
            continue
        a, e = sd[k].numpy(), _expected_array(v)
        assert a.dtype == e.dtype and a.dtype.isnative and a.shape == e.shape and np.array_equal(a, e), k
    assert sd["param"].is_parameter
    assert sd["view_t"].storage is sd["view_off"].storage


def test_roundtrip_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([1.0, -2.5, 3.140625, 1e30], np.float32)
    got = _load(_ckpt_bytes({"w": x.astype(ml_dtypes.bfloat16)}))["w"]
    assert got.dtype == "bfloat16"
    assert np.array_equal(got.numpy(), x.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_writer_is_deterministic_and_aligned():
    obj = _roundtrip_obj()
    raw = _ckpt_bytes(obj)
    assert raw == _ckpt_bytes(obj)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        names = zf.namelist()
        assert names[0] == "archive/data.pkl" and "archive/version" in names and "archive/byteorder" in names
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            if info.filename.startswith("archive/data/"):
                start = info.header_offset + 30 + len(info.filename) + len(info.extra)
                assert start % 64 == 0


def test_path_and_file_sources(tmp_path):
    path = tmp_path / "checkpoint.ckpt"
    torch_zip.write_checkpoint(path, {"w": np.arange(3, dtype=np.int64)})
    assert _load(path)["w"].numpy().tolist() == [0, 1, 2]
    assert _load(str(path))["w"].numpy().tolist() == [0, 1, 2]
    with open(path, "rb") as f:
        assert _load(f)["w"].numpy().tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "missing.ckpt")


# --- a checkpoint inside an outer zip ------------------------------------------------------------


class _CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it."""

    def __init__(self, f):
        self._f = f
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self._f.seek(offset, whence)

    def tell(self):
        return self._f.tell()

    def read(self, n=-1):
        data = self._f.read(n)
        self.bytes_read += len(data)
        return data


def test_nested_in_an_outer_zip_reads_lazily(tmp_path):
    big = np.arange(1 << 20, dtype=np.float32)  # a 4 MiB storage that stays unread
    small = np.array([[1, 2], [3, 4]], np.int16)
    inner = _ckpt_bytes({"state_dict": OrderedDict(big=big, small=small)}, archive_name="checkpoint")
    outer = tmp_path / "scene.usdz"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.writestr("volume.nurec", b"x" * 1000, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("checkpoint.ckpt", inner, compress_type=zipfile.ZIP_STORED)
    with open(outer, "rb") as raw:
        counting = _CountingFile(raw)
        with zipfile.ZipFile(counting) as zf, zf.open("checkpoint.ckpt") as member:
            sd = state_dict_arrays(load_checkpoint(member, where="scene.usdz:checkpoint.ckpt", max_member_bytes=LIMIT))
            assert np.array_equal(sd["small"].numpy(), small)
            assert sd["big"].shape == (1 << 20,)
            assert counting.bytes_read < len(inner) // 20, counting.bytes_read
            assert np.array_equal(sd["big"].numpy(), big)
            assert counting.bytes_read < 2 * len(inner)


def test_setting_state_on_an_allowed_callable_is_refused():
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00aK\x01sb."
    with pytest.raises(UnsafeCheckpointError, match="_rebuild_tensor_v2"):
        _load(_archive_bytes(pkl))


def test_container_copy_bomb_is_refused():
    # set(L) for one 1000-item list L, referenced 10000 times through the memo.
    items = b"".join(b"M" + i.to_bytes(2, "little") for i in range(1000))
    call = b"h\x00h\x01\x85R"
    pkl = b"\x80\x02c__builtin__\nset\nq\x00](" + items + b"eq\x01](" + call * 10000 + b"e."
    with pytest.raises(SceneFormatError, match="far more container items"):
        _load(_archive_bytes(pkl))
