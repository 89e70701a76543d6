"""A small writer of PyTorch's `torch.save` zip checkpoint format, in pure Python (no torch).

Tests and the synthetic-scene generator use it to write `checkpoint.ckpt` files where PyTorch is
not installed. The output has torch's layout (`archive/data.pkl`, `archive/data/<key>`,
`archive/byteorder`, `archive/version`, ..., stored uncompressed, storage data aligned to 64
bytes) and its pickle is protocol 2 with the globals torch 2.x emits: numpy arrays become
`torch._utils._rebuild_tensor_v2` over `torch.<Type>Storage` persistent ids (`_rebuild_tensor_v3`
over `torch.storage.UntypedStorage` for uint16/32/64, as torch does), `Parameter` becomes
`torch._utils._rebuild_parameter`, OrderedDicts `collections.OrderedDict`. `torch.load(...,
weights_only=True)` reads the result.

    write_checkpoint("checkpoint.ckpt", {"state_dict": OrderedDict(w=np.zeros((2, 3), np.float32))})

The output is deterministic (fixed zip dates, serialization id derived from the content).
"""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

__all__ = ["Parameter", "TensorView", "dumps", "write_archive", "write_checkpoint"]

# numpy dtype name -> (legacy storage class or None for an untyped storage, torch dtype name)
_DTYPES: dict[str, tuple[str | None, str]] = {
    "float32": ("FloatStorage", "float32"),
    "float64": ("DoubleStorage", "float64"),
    "float16": ("HalfStorage", "float16"),
    "bfloat16": ("BFloat16Storage", "bfloat16"),  # ml_dtypes.bfloat16 arrays
    "int64": ("LongStorage", "int64"),
    "int32": ("IntStorage", "int32"),
    "int16": ("ShortStorage", "int16"),
    "int8": ("CharStorage", "int8"),
    "uint8": ("ByteStorage", "uint8"),
    "bool": ("BoolStorage", "bool"),
    "uint16": (None, "uint16"),
    "uint32": (None, "uint32"),
    "uint64": (None, "uint64"),
}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_ALIGN = 64


@dataclass(frozen=True, eq=False)
class TensorView:
    """A tensor over (part of) a 1-D storage array, in elements; views of the same `storage`
    object share one storage in the checkpoint. Nothing checks that the view fits the storage
    (tests use that to write malformed files)."""

    storage: np.ndarray
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0


@dataclass(frozen=True, eq=False)
class Parameter:
    """Written as an `nn.Parameter` around `data`."""

    data: np.ndarray | TensorView
    requires_grad: bool = True


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


class _Emitter:
    """Writes protocol-2 pickle opcodes for the supported data model."""

    def __init__(self, byteorder: str):
        self.out = bytearray(b"\x80\x02")
        self.memo: dict[Any, int] = {}
        self.storages: dict[str, bytes] = {}
        self._storage_keys: dict[int, str] = {}
        self._keep: list[Any] = []  # keeps storage arrays alive so their ids stay unique
        self._byteorder = "<" if byteorder == "little" else ">"
        self._depth = 0

    def _put(self, key: Any) -> None:
        i = len(self.memo)
        self.memo[key] = i
        self.out += b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)

    def global_(self, module: str, name: str) -> None:
        key = ("global", module, name)
        i = self.memo.get(key)
        if i is not None:
            self.out += b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)
            return
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self._put(key)

    def int_(self, x: int) -> None:
        if 0 <= x < 256:
            self.out += b"K" + bytes([x])
        elif 0 <= x < 65536:
            self.out += b"M" + struct.pack("<H", x)
        elif -(2**31) <= x < 2**31:
            self.out += b"J" + struct.pack("<i", x)
        else:
            raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
            if len(raw) > 255:
                raise ValueError("integer too large")
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def str_(self, s: str) -> None:
        raw = s.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(raw)) + raw

    def tuple_(self, items: tuple | list) -> None:
        n = len(items)
        if n == 0:
            self.out += b")"
            return
        if n > 3:
            self.out += b"("
        for item in items:
            self.save(item)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(n, b"t")

    def save(self, obj: Any) -> None:
        self._depth += 1
        if self._depth > 200:
            raise ValueError("object nests too deeply (or is cyclic)")
        try:
            self._save(obj)
        finally:
            self._depth -= 1

    def _save(self, obj: Any) -> None:
        if obj is None:
            self.out += b"N"
        elif obj is True:
            self.out += b"\x88"
        elif obj is False:
            self.out += b"\x89"
        elif isinstance(obj, int):
            self.int_(int(obj))
        elif isinstance(obj, float):
            self.out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            self.str_(obj)
        elif isinstance(obj, (bytes, bytearray)):
            # Protocol 2 spells bytes as _codecs.encode(<latin-1 text>, 'latin1'); pickle itself
            # writes b'' as bytes(), which torch.load(weights_only=True) refuses, so not here.
            self.global_("_codecs", "encode")
            self.tuple_((bytes(obj).decode("latin-1"), "latin1"))
            self.out += b"R"
        elif isinstance(obj, tuple):
            self.tuple_(obj)
        elif isinstance(obj, list):
            self.out += b"]"
            if obj:
                self.out += b"("
                for item in obj:
                    self.save(item)
                self.out += b"e"
        elif isinstance(obj, OrderedDict):
            self.global_("collections", "OrderedDict")
            self.out += b")R"
            self._items(obj)
        elif isinstance(obj, dict):
            self.out += b"}"
            self._items(obj)
        elif isinstance(obj, (np.ndarray, TensorView)):
            self._tensor(obj)
        elif isinstance(obj, Parameter):
            self.global_("torch._utils", "_rebuild_parameter")
            self.out += b"("
            self._tensor(obj.data)
            self.save(bool(obj.requires_grad))
            self._empty_ordered_dict()
            self.out += b"tR"
        else:
            raise TypeError(f"cannot write {type(obj).__name__} into a torch checkpoint")

    def _items(self, d: Mapping) -> None:
        if d:
            self.out += b"("
            for k, v in d.items():
                self.save(k)
                self.save(v)
            self.out += b"u"

    def _empty_ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"

    def _storage_key(self, storage: np.ndarray) -> str:
        key = self._storage_keys.get(id(storage))
        if key is None:
            key = str(len(self._storage_keys))
            flat = np.ascontiguousarray(storage).reshape(-1)
            if flat.dtype.name == "bfloat16":
                flat = flat.view(np.uint16)
            self.storages[key] = flat.astype(flat.dtype.newbyteorder(self._byteorder)).tobytes()
            self._storage_keys[id(storage)] = key
            self._keep.append(storage)
        return key

    def _tensor(self, t: np.ndarray | TensorView) -> None:
        if isinstance(t, np.ndarray):
            storage = t if t.flags.c_contiguous else np.ascontiguousarray(t)
            view = TensorView(storage, tuple(t.shape), _contiguous_strides(tuple(t.shape)), 0)
            if storage is not t:
                self._keep.append(storage)
        else:
            view = t
        dtype_name = view.storage.dtype.name
        if dtype_name not in _DTYPES:
            raise TypeError(f"dtype {dtype_name} has no torch storage type here")
        storage_class, torch_dtype = _DTYPES[dtype_name]
        key = self._storage_key(view.storage)
        numel = int(view.storage.size)
        self.global_("torch._utils", "_rebuild_tensor_v2" if storage_class else "_rebuild_tensor_v3")
        self.out += b"(("
        self.str_("storage")
        if storage_class:
            self.global_("torch", storage_class)
        else:
            self.global_("torch.storage", "UntypedStorage")
            numel *= view.storage.dtype.itemsize
        self.str_(key)
        self.str_("cpu")
        self.int_(numel)
        self.out += b"tQ"
        self.int_(int(view.offset))
        self.tuple_(tuple(int(d) for d in view.shape))
        self.tuple_(tuple(int(s) for s in view.stride))
        self.out += b"\x89"  # requires_grad
        self._empty_ordered_dict()  # backward hooks
        if not storage_class:
            self.global_("torch", torch_dtype)
        self.out += b"tR"


def dumps(obj: Any, *, byteorder: str = "little") -> tuple[bytes, dict[str, bytes]]:
    """The `data.pkl` bytes for `obj` and the storage bytes by key."""
    if byteorder not in ("little", "big"):
        raise ValueError("byteorder must be 'little' or 'big'")
    e = _Emitter(byteorder)
    e.save(obj)
    e.out += b"."
    return bytes(e.out), e.storages


def _aligned_info(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    data_start = zf.fp.tell() + 30 + len(name.encode())
    pad = -data_start % _ALIGN
    if pad:
        if pad < 4:
            pad += _ALIGN
        info.extra = struct.pack("<HH", 0x4246, pad - 4) + b"Z" * (pad - 4)  # torch's "FB" padding
    return info


def write_archive(
    path_or_file: str | os.PathLike | BinaryIO,
    data_pkl: bytes,
    storages: Mapping[str, bytes],
    *,
    archive_name: str = "archive",
    byteorder: str = "little",
) -> None:
    """Writes the zip container around an already-made `data.pkl` and its storages."""
    pkl_digest = int.from_bytes(hashlib.sha256(data_pkl).digest()[:16], "big")
    serialization_id = str(pkl_digest % 10**40).zfill(40)
    target = os.fspath(path_or_file) if isinstance(path_or_file, (str, os.PathLike)) else path_or_file
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zf:
        members: list[tuple[str, bytes]] = [
            ("data.pkl", data_pkl),
            (".format_version", b"1"),
            (".storage_alignment", str(_ALIGN).encode()),
            ("byteorder", byteorder.encode()),
            *((f"data/{k}", v) for k, v in storages.items()),
            ("version", b"3\n"),
            (".data/serialization_id", serialization_id.encode()),
        ]
        for name, payload in members:
            zf.writestr(_aligned_info(zf, f"{archive_name}/{name}"), payload)


def write_checkpoint(
    path_or_file: str | os.PathLike | BinaryIO,
    obj: Any,
    *,
    archive_name: str = "archive",
    byteorder: str = "little",
) -> None:
    """Writes `obj` as torch.save would: nested dicts (OrderedDicts stay OrderedDicts), lists,
    tuples, str/int/float/bool/None/bytes, with numpy arrays, `TensorView`s and `Parameter`s as
    tensors. float16/32/64, bfloat16 (ml_dtypes), int8/16/32/64, uint8/16/32/64 and bool."""
    data_pkl, storages = dumps(obj, byteorder=byteorder)
    write_archive(path_or_file, data_pkl, storages, archive_name=archive_name, byteorder=byteorder)
