"""Reading PyTorch checkpoints (`torch.save` zip archives) without PyTorch and without running them.

A checkpoint written by `torch.save` (and so a PyTorch Lightning `checkpoint.ckpt`) is a zip
archive with one top-level folder, `<prefix>/`, holding:

- `data.pkl`: a protocol-2 pickle of the saved object. Tensors appear in it as calls of
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`
  (`_rebuild_tensor_v3(..., dtype)` for dtypes without a legacy storage class, `_rebuild_parameter`
  around it for `nn.Parameter`), and each storage is a persistent id
  `('storage', torch.FloatStorage, '<key>', 'cpu', numel)`;
- `data/<key>`: the raw bytes of one storage;
- `byteorder` (`little` or `big`; absent means little), `version`, `.format_version`, ...

Unpickling such a file with `pickle` would let it call anything. This module's unpickler resolves
only a fixed set of global names, each to an implementation of ours (the tensor rebuild helpers
build `LazyTensor`s; storage classes and dtypes are plain markers), and a short list of inert data
classes common in Lightning checkpoints (omegaconf configs, AttributeDict, pathlib paths, numpy
scalars and arrays) to `InertObject` placeholders that only record the arguments and state the
pickle gives them. Any other global is refused with `UnsafeCheckpointError` before anything is
called; so are persistent ids other than torch's storage tuple.

Storages are read lazily: `LazyTensor.numpy()` reads `<prefix>/data/<key>` the first time a
tensor over that storage is materialised (views of one storage share one read). The source must
stay open until then.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import re
import reprlib
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, Self

import numpy as np

from nurec_jax.errors import SceneFormatError, UnsupportedSceneError

__all__ = [
    "InertObject",
    "LazyStorage",
    "LazyTensor",
    "TorchDtype",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "state_dict_arrays",
]


class UnsafeCheckpointError(SceneFormatError):
    """A checkpoint's pickle asks for a global, call or persistent id outside the allow-list."""


# --- dtypes and storage classes ------------------------------------------------------------------

# torch dtype name -> (numpy type code of one stored element, itemsize). bfloat16 is read as raw
# uint16 and widened to float32; bool is read as uint8 and compared with 0.
_DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("f4", 4),
    "float64": ("f8", 8),
    "float16": ("f2", 2),
    "bfloat16": ("u2", 2),
    "int64": ("i8", 8),
    "int32": ("i4", 4),
    "int16": ("i2", 2),
    "int8": ("i1", 1),
    "uint8": ("u1", 1),
    "bool": ("u1", 1),
    "uint16": ("u2", 2),
    "uint32": ("u4", 4),
    "uint64": ("u8", 8),
}
# dtypes torch can write that we recognise but cannot turn into numpy arrays.
_UNSUPPORTED_DTYPES = frozenset(
    {"complex32", "complex64", "complex128", "qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
    | {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}
    | {"float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16"}
    | {f"uint{n}" for n in range(1, 8)}
    | {f"int{n}" for n in range(1, 8)}
)
# Legacy typed-storage class (global `torch.<Name>`) -> dtype name.
_STORAGE_CLASSES: dict[str, str] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}


class _Marker:
    """Base of the inert stand-ins for torch classes: not callable, no state can be set on them."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(f"refused a call of {self!r} (not executed)")

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"refused setting state on {self!r}")


class TorchDtype(_Marker):
    """Stands for a `torch.<dtype>` global; `name` is e.g. 'float32'."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchDtype) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("TorchDtype", self.name))


class _StorageClass(_Marker):
    """Stands for a storage class global; `dtype` is None for `torch.storage.UntypedStorage`."""

    __slots__ = ("dtype", "qualname")

    def __init__(self, qualname: str, dtype: str | None):
        self.qualname = qualname
        self.dtype = dtype

    def __repr__(self) -> str:
        return self.qualname


class _TensorClass(_Marker):
    """Stands for `torch.Tensor` / `torch.nn.parameter.Parameter` as passed to _rebuild_from_type_v2."""

    __slots__ = ("is_parameter", "qualname")

    def __init__(self, qualname: str, is_parameter: bool):
        self.qualname = qualname
        self.is_parameter = is_parameter

    def __repr__(self) -> str:
        return self.qualname


_TORCH_DTYPES = {f"torch.{n}": TorchDtype(n) for n in (*_DTYPES, *sorted(_UNSUPPORTED_DTYPES))}
_TENSOR = _TensorClass("torch.Tensor", False)
_PARAMETER = _TensorClass("torch.nn.parameter.Parameter", True)


# --- inert placeholders --------------------------------------------------------------------------


class InertObject:
    """Placeholder for an allow-listed foreign class or function: it only records what the pickle
    passed to it. `qualname` names what it stands for; `args`/`kwargs` are the constructor (or
    call) arguments, `state` what BUILD gave it, `items` and `list_items` what SETITEMS/APPENDS
    added. None of the real class's code runs, so the object is a description, not the value."""

    qualname: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items: dict[Any, Any] = {}
        self.list_items: list[Any] = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.qualname} args={_short(self.args)} state={_short(self.state)}>"


# Globals that map to InertObject placeholders: configuration and metadata containers that
# Lightning checkpoints carry next to the weights (hyper_parameters, callbacks, loops). The
# builtins and typing names appear only as type references inside omegaconf metadata.
_INERT_GLOBALS = frozenset(
    {
        "omegaconf.dictconfig.DictConfig",
        "omegaconf.listconfig.ListConfig",
        "omegaconf.base.ContainerMetadata",
        "omegaconf.base.Metadata",
        "omegaconf.nodes.AnyNode",
        "omegaconf.nodes.StringNode",
        "omegaconf.nodes.IntegerNode",
        "omegaconf.nodes.FloatNode",
        "omegaconf.nodes.BooleanNode",
        "omegaconf.nodes.BytesNode",
        "omegaconf.nodes.PathNode",
        "typing.Any",
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.bool",
        "builtins.object",
        "lightning_fabric.utilities.data.AttributeDict",
        "lightning.fabric.utilities.data.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "pathlib.WindowsPath",
        "pathlib.PureWindowsPath",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
    }
)
_INERT_CLASSES: dict[str, type[InertObject]] = {}


def _inert_class(qualname: str) -> type[InertObject]:
    cls = _INERT_CLASSES.get(qualname)
    if cls is None:
        cls = type(f"Inert[{qualname}]", (InertObject,), {"qualname": qualname, "__module__": __name__})
        _INERT_CLASSES[qualname] = cls
    return cls


# --- archive access ------------------------------------------------------------------------------


class _RewindingReader:
    """Seekable view of a `zipfile.ZipExtFile` that makes backward seeks cheap.

    A ZipExtFile seeks backward by rewinding to the member's start and reading forward to the
    target; seeking to 0 first and then forward takes its fast path for stored members instead."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        start = raw.tell()
        self._size = raw.seek(0, os.SEEK_END)
        self.seek(start)

    def read(self, n: int = -1) -> bytes:
        return self._raw.read(n)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._raw.tell()
        elif whence == os.SEEK_END:
            offset += self._size
        target = max(0, offset)
        if target < self._raw.tell():
            self._raw.seek(0)
        return self._raw.seek(target)


class _Archive:
    """The zip container of one checkpoint, kept open for lazy storage reads."""

    def __init__(self, source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO, where: str):
        self.where = where
        if isinstance(source, (str, os.PathLike)):
            fileobj: Any = os.fspath(source)
            if not os.path.isfile(fileobj):
                raise FileNotFoundError(f"{where}: checkpoint not found: {fileobj}")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            fileobj = io.BytesIO(bytes(source))
        elif hasattr(source, "read") and hasattr(source, "seek"):
            if not source.seekable():
                raise SceneFormatError(f"{where}: the checkpoint stream is not seekable")
            fileobj = _RewindingReader(source) if isinstance(source, zipfile.ZipExtFile) else source
        else:
            raise TypeError(f"{where}: expected a path, bytes or a binary file, got {type(source).__name__}")
        try:
            self.zip = zipfile.ZipFile(fileobj)
        except zipfile.BadZipFile as e:
            raise SceneFormatError(
                f"{where}: not a zip archive, or truncated ({e}); only the zip format that torch.save "
                "writes since PyTorch 1.6 is read"
            ) from None
        except (OSError, EOFError, ValueError) as e:
            raise SceneFormatError(f"{where}: cannot be read ({e})") from None
        self.infos = {info.filename: info for info in self.zip.infolist()}
        prefixes = sorted(
            name[: -len("/data.pkl")] for name in self.infos if name.endswith("/data.pkl") and name.count("/") == 1
        )
        if not prefixes:
            raise SceneFormatError(f"{where}: no <folder>/data.pkl member: not a PyTorch checkpoint")
        if len(prefixes) > 1:
            raise SceneFormatError(f"{where}: several data.pkl members ({', '.join(prefixes)})")
        self.prefix = prefixes[0]

    def size(self, member: str) -> int | None:
        info = self.infos.get(f"{self.prefix}/{member}")
        return None if info is None else info.file_size

    def read(self, member: str, limit: int, exact: int | None = None) -> bytes:
        """Reads `<prefix>/<member>`; at most `limit` bytes, exactly `exact` bytes when given."""
        name = f"{self.prefix}/{member}"
        info = self.infos.get(name)
        if info is None:
            raise SceneFormatError(f"{self.where}: member {name} is missing")
        if info.file_size > limit:
            raise SceneFormatError(
                f"{self.where}: member {name} holds {info.file_size} bytes, over the limit of {limit}"
            )
        want = info.file_size if exact is None else exact
        if info.file_size != want:
            raise SceneFormatError(f"{self.where}: member {name} holds {info.file_size} bytes, expected {want}")
        out = bytearray()
        try:
            with self.zip.open(info) as f:
                while len(out) <= want and (chunk := f.read(min(1 << 20, want + 1 - len(out)))):
                    out += chunk
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise SceneFormatError(f"{self.where}: member {name} is corrupt or truncated ({e})") from None
        except NotImplementedError as e:
            raise SceneFormatError(f"{self.where}: member {name}: unsupported compression ({e})") from None
        if len(out) != want:
            raise SceneFormatError(f"{self.where}: member {name} is truncated: read {len(out)} of {want} bytes")
        return bytes(out)


# --- storages and tensors ------------------------------------------------------------------------


class LazyStorage:
    """One storage of the checkpoint (`<prefix>/data/<key>`), read on first use and then kept.

    `dtype` is the element dtype name for a typed storage, None for an untyped (byte) storage;
    `nbytes` is its size. `reads` counts how often the member was read (0 or 1)."""

    __slots__ = ("_archive", "_data", "_limit", "byteorder", "dtype", "key", "nbytes", "reads")

    def __init__(
        self,
        archive: _Archive,
        key: str,
        dtype: str | None,
        nbytes: int,
        byteorder: str,
        limit: int,
    ):
        self.key = key
        self.dtype = dtype
        self.nbytes = nbytes
        self.byteorder = byteorder
        self.reads = 0
        self._archive = archive
        self._limit = limit
        self._data: bytes | None = None

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"refused setting state on storage data/{self.key}")

    @property
    def member(self) -> str:
        return f"{self._archive.prefix}/data/{self.key}"

    def raw(self) -> bytes:
        """The storage's bytes (read from the archive the first time)."""
        if self._data is None:
            self._data = self._archive.read(f"data/{self.key}", self._limit, exact=self.nbytes)
            self.reads += 1
        return self._data

    def __repr__(self) -> str:
        return f"LazyStorage(data/{self.key}, dtype={self.dtype}, nbytes={self.nbytes})"


def _element_dtype(name: str, byteorder: str) -> np.dtype:
    code, _ = _DTYPES[name]
    return np.dtype(("<" if byteorder == "little" else ">") + code)


class LazyTensor:
    """A tensor of the checkpoint, described but not yet read.

    `dtype` is the torch dtype name ('float32', 'bfloat16', ...), `shape` and `stride` are in
    elements, `storage_offset` is the index of its first element in `storage`. `is_parameter` is
    True for an `nn.Parameter`; `attributes` holds Python attributes saved with the tensor (plain
    data only). `numpy()` returns a fresh array (bfloat16 widened to float32)."""

    __slots__ = (
        "_where",
        "attributes",
        "dtype",
        "is_parameter",
        "negative",
        "shape",
        "storage",
        "storage_offset",
        "stride",
    )

    def __init__(
        self,
        storage: LazyStorage,
        dtype: str,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        storage_offset: int,
        *,
        where: str,
        negative: bool = False,
    ):
        self.storage = storage
        self.dtype = dtype
        self.shape = shape
        self.stride = stride
        self.storage_offset = storage_offset
        self.is_parameter = False
        self.attributes: Any = None
        self.negative = negative
        self._where = where
        self._check_bounds()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"{self._where}: refused setting state on a tensor")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][1]

    def _fail(self, what: str) -> SceneFormatError:
        return SceneFormatError(
            f"{self._where}: tensor over storage data/{self.storage.key} (shape {self.shape}, "
            f"stride {self.stride}, offset {self.storage_offset}): {what}"
        )

    def _check_bounds(self) -> None:
        if len(self.stride) != len(self.shape):
            raise self._fail("stride and shape differ in length")
        if self.storage.nbytes % self.itemsize:
            raise self._fail(f"storage size {self.storage.nbytes} is not a multiple of {self.itemsize}")
        out_bytes = self.size * (4 if self.dtype == "bfloat16" else self.itemsize)
        if out_bytes > self.storage._limit:
            raise self._fail(f"{out_bytes} bytes exceeds the limit of {self.storage._limit}")
        if self.size == 0:
            return
        numel = self.storage.nbytes // self.itemsize
        last = self.storage_offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride))
        if self.storage_offset >= numel or last >= numel:
            raise self._fail(f"reaches element {last}, outside the storage of {numel} elements")

    def numpy(self) -> np.ndarray:
        """Reads the storage (once per storage) and returns this tensor as a new numpy array."""
        self._check_bounds()
        elem = _element_dtype(self.dtype, self.storage.byteorder)
        if self.size == 0:
            flat_view = np.empty(self.shape, dtype=elem)
        else:
            flat = np.frombuffer(self.storage.raw(), dtype=elem)
            flat_view = np.lib.stride_tricks.as_strided(
                flat[self.storage_offset :],
                shape=self.shape,
                strides=tuple(s * elem.itemsize for s in self.stride),
                writeable=False,
            )
        out = np.array(flat_view, dtype=elem.newbyteorder("="), order="C")
        if self.dtype == "bfloat16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        elif self.dtype == "bool":
            out = out != 0
        if self.negative:
            out = np.negative(out)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        kind = "Parameter" if self.is_parameter else "LazyTensor"
        return f"{kind}(dtype={self.dtype}, shape={self.shape}, storage=data/{self.storage.key})"


# --- the unpickler -------------------------------------------------------------------------------


class _Call:
    """An allow-listed callable as the pickle sees it: calling it runs our implementation;
    nothing can be set on it (a bare bound method would let BUILD write into its __dict__)."""

    __slots__ = ("_fn", "qualname")

    def __init__(self, qualname: str, fn: Callable[..., Any]):
        self.qualname = qualname
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"refused setting state on {self.qualname}")

    def __repr__(self) -> str:
        return self.qualname


_REBUILDERS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
)
_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _CheckpointUnpickler(pickle.Unpickler):
    """Resolves globals from a fixed table of our own implementations and refuses the rest."""

    def __init__(self, data: bytes, archive: _Archive, byteorder: str, limit: int):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._where = archive.where
        self._byteorder = byteorder
        self._limit = limit
        self._storages: dict[str, LazyStorage] = {}
        # Items copied into containers built by calls; with memo references a short pickle
        # could otherwise make huge copies (set(L) a million times over).
        self._copy_budget = 4 * len(data) + 4096
        calls: dict[str, Callable[..., Any]] = {
            "collections.OrderedDict": self._ordered_dict,
            "collections.defaultdict": self._defaultdict,
            "builtins.set": self._set,
            "builtins.frozenset": self._frozenset,
            "builtins.bytes": self._bytes,
            "_codecs.encode": self._codecs_encode,
            "torch.Size": self._torch_size,
            "torch.device": self._torch_device,
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter_with_state,
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
        }
        self._globals: dict[str, Any] = {
            **{name: _Call(name, fn) for name, fn in calls.items()},
            "torch.Tensor": _TENSOR,
            "torch._tensor.Tensor": _TENSOR,
            "torch.nn.parameter.Parameter": _PARAMETER,
            "torch.storage.UntypedStorage": _StorageClass("torch.storage.UntypedStorage", None),
            "torch.UntypedStorage": _StorageClass("torch.UntypedStorage", None),
            **{f"torch.{n}": _StorageClass(f"torch.{n}", d) for n, d in _STORAGE_CLASSES.items()},
            **_TORCH_DTYPES,
        }
        self._rebuilders = {self._globals[f"torch._utils.{n}"] for n in _REBUILDERS}

    def _bad(self, what: str) -> SceneFormatError:
        return SceneFormatError(f"{self._where}: data.pkl: {what}")

    # pickle hooks

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        found = self._globals.get(qualname)
        if found is not None:
            return found
        if qualname in _INERT_GLOBALS:
            return _inert_class(qualname)
        raise UnsafeCheckpointError(
            f"{self._where}: data.pkl refers to the global {qualname}, which is not on the allow-list "
            "of tensor and plain-data types; it was refused and not executed"
        )

    def persistent_load(self, pid: Any) -> LazyStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(
                f"{self._where}: data.pkl has a persistent id {_short(pid)} that is not a torch storage "
                "reference; refused"
            )
        _, cls, key, location, numel = pid
        if not isinstance(cls, _StorageClass):
            raise UnsafeCheckpointError(f"{self._where}: storage reference with type {_short(cls)}; refused")
        if not (isinstance(key, str) and _KEY_RE.fullmatch(key) and key not in (".", "..")):
            raise self._bad(f"invalid storage key {_short(key)}")
        if not isinstance(location, str) or not _is_int(numel) or numel < 0:
            raise self._bad(f"invalid storage reference {_short(pid)}")
        dtype = cls.dtype
        if dtype is not None and dtype not in _DTYPES:
            raise UnsupportedSceneError(f"{self._where}: storage data/{key} has unsupported type {cls!r} ({dtype})")
        nbytes = numel if dtype is None else numel * _DTYPES[dtype][1]
        known = self._storages.get(key)
        if known is not None:
            if known.dtype != dtype or known.nbytes != nbytes:
                raise self._bad(f"storage data/{key} is referenced with different types or sizes")
            return known
        if nbytes > self._limit:
            raise SceneFormatError(
                f"{self._where}: storage data/{key} holds {nbytes} bytes, over the limit of {self._limit}"
            )
        size = self._archive.size(f"data/{key}")
        member = f"{self._archive.prefix}/data/{key}"
        if size is None:
            raise SceneFormatError(f"{self._where}: storage member {member} is missing")
        if size != nbytes:
            raise SceneFormatError(
                f"{self._where}: storage member {member} holds {size} bytes, expected {nbytes} ({numel} x {cls!r})"
            )
        storage = LazyStorage(self._archive, key, dtype, nbytes, self._byteorder, self._limit)
        self._storages[key] = storage
        return storage

    # allow-listed callables

    def _dims(self, x: Any, what: str) -> tuple[int, ...]:
        if not isinstance(x, (tuple, list)) or not all(_is_int(d) and d >= 0 for d in x) or len(x) > 64:
            raise self._bad(f"tensor {what} must be a tuple of non-negative ints, got {_short(x)}")
        return tuple(x)

    def _tensor(
        self, storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None, metadata: Any
    ) -> LazyTensor:
        if not isinstance(storage, LazyStorage):
            raise self._bad(f"tensor storage must be a storage reference, got {_short(storage)}")
        if not _is_int(offset) or offset < 0:
            raise self._bad(f"invalid storage offset {_short(offset)}")
        if dtype is None:
            if storage.dtype is None:
                raise self._bad("a tensor over an untyped storage needs a dtype")
            dtype = storage.dtype
        elif storage.dtype is not None and storage.dtype != dtype:
            raise self._bad(f"tensor dtype {dtype} differs from its storage's {storage.dtype}")
        if dtype not in _DTYPES:
            raise UnsupportedSceneError(f"{self._where}: tensor over data/{storage.key} has unsupported dtype {dtype}")
        negative = False
        if metadata:
            if not isinstance(metadata, dict) or not set(metadata) <= {"neg", "conj"} or metadata.get("conj"):
                raise UnsupportedSceneError(f"{self._where}: unsupported tensor metadata {_short(metadata)}")
            negative = bool(metadata.get("neg"))
        return LazyTensor(
            storage,
            dtype,
            self._dims(size, "size"),
            self._dims(stride, "stride"),
            offset,
            where=self._where,
            negative=negative,
        )

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> LazyTensor:
        return self._tensor(storage, offset, size, stride, None, None)

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> LazyTensor:
        return self._tensor(storage, offset, size, stride, None, metadata)

    def _rebuild_tensor_v3(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> LazyTensor:
        if not isinstance(dtype, TorchDtype):
            raise self._bad(f"_rebuild_tensor_v3 needs a torch dtype, got {_short(dtype)}")
        return self._tensor(storage, offset, size, stride, dtype.name, metadata)

    def _as_parameter(self, data: Any) -> LazyTensor:
        if not isinstance(data, LazyTensor):
            raise self._bad(f"a Parameter must wrap a tensor, got {_short(data)}")
        data.is_parameter = True
        return data

    def _rebuild_parameter(self, data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> LazyTensor:
        return self._as_parameter(data)

    def _rebuild_parameter_with_state(
        self, data: Any, requires_grad: Any, backward_hooks: Any, state: Any
    ) -> LazyTensor:
        tensor = self._as_parameter(data)
        tensor.attributes = state
        return tensor

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> LazyTensor:
        if func not in self._rebuilders or not isinstance(new_type, _TensorClass) or not isinstance(args, tuple):
            raise UnsafeCheckpointError(
                f"{self._where}: _rebuild_from_type_v2 with {_short(func)} / {_short(new_type)} refused"
            )
        tensor = func(*args)
        if new_type.is_parameter:
            tensor.is_parameter = True
        tensor.attributes = state
        return tensor

    def _torch_size(self, dims: Any = ()) -> tuple[int, ...]:
        return self._dims(dims, "Size")

    def _torch_device(self, kind: Any, index: Any = None) -> str:
        if not isinstance(kind, str) or not (index is None or _is_int(index)):
            raise self._bad(f"invalid torch.device {_short((kind, index))}")
        return kind if index is None else f"{kind}:{index}"

    def _spend(self, n: int) -> None:
        self._copy_budget -= n
        if self._copy_budget < 0:
            raise self._bad("it builds far more container items than it holds")

    def _items(self, items: Any) -> list:
        if isinstance(items, Mapping):
            items = list(items.items())
        if not isinstance(items, (list, tuple)):
            raise self._bad(f"a container built from {_short(items)}")
        self._spend(len(items))
        return list(items)

    def _ordered_dict(self, items: Any = ()) -> OrderedDict:
        return OrderedDict(self._items(items))

    def _set(self, items: Any = ()) -> set:
        return set(self._items(items))

    def _frozenset(self, items: Any = ()) -> frozenset:
        return frozenset(self._items(items))

    def _defaultdict(self, default_factory: Any = None) -> dict:
        # The factory is dropped: the result is a plain dict of what the pickle puts into it.
        return {}

    def _bytes(self, *args: Any) -> bytes:
        if args == ():
            return b""
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            self._spend(len(args[0]))
            return bytes(args[0])
        raise self._bad(f"builtins.bytes called with {_short(args)}")

    def _codecs_encode(self, text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
        # Protocol-2 pickles write bytes as _codecs.encode(<latin-1 str>, 'latin1').
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise UnsafeCheckpointError(f"{self._where}: _codecs.encode{_short((text, encoding))} refused")
        self._spend(len(text))
        return text.encode("latin-1")


_REPR = reprlib.Repr(maxlevel=3, maxtuple=6, maxlist=6, maxdict=6, maxset=6, maxstring=60, maxother=60)


def _short(x: Any) -> str:
    """A bounded repr: pickles can reference one object many times, so a full repr may explode."""
    r = _REPR.repr(x)
    return r if len(r) <= 160 else r[:157] + "..."


# --- public API ----------------------------------------------------------------------------------


def load_checkpoint(
    source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO,
    *,
    where: str,
    max_member_bytes: int,
) -> Any:
    """Unpickles a `torch.save` checkpoint with the restricted unpickler.

    `source` is a path, the file's bytes, or a seekable binary file (for example a member of an
    outer zip opened with `ZipFile.open`; it must stay open while tensors are materialised).
    Tensors come back as `LazyTensor`s; everything else as dicts, lists, tuples, primitives,
    OrderedDicts, sets, or `InertObject` placeholders. `where` prefixes every error message;
    `max_member_bytes` bounds data.pkl, each storage and each materialised tensor."""
    archive = _Archive(source, where)
    byteorder = "little"
    if archive.size("byteorder") is not None:
        raw = archive.read("byteorder", 64).strip()
        if raw not in (b"little", b"big"):
            raise SceneFormatError(f"{where}: {archive.prefix}/byteorder is {raw[:16]!r}, not little or big")
        byteorder = raw.decode()
    data = archive.read("data.pkl", max_member_bytes)
    unpickler = _CheckpointUnpickler(data, archive, byteorder, max_member_bytes)
    try:
        return unpickler.load()
    except SceneFormatError:
        raise
    except RecursionError:
        raise SceneFormatError(f"{where}: data.pkl nests too deeply") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
        UnicodeDecodeError,
    ) as e:
        raise SceneFormatError(
            f"{where}: data.pkl is not a valid checkpoint pickle ({type(e).__name__}: {e})"
        ) from None


def state_dict_arrays(obj: Any, prefix: str = "") -> dict[str, LazyTensor | Any]:
    """The flat state dict of a loaded checkpoint: the `state_dict` entry of a Lightning
    checkpoint dict, or `obj` itself when it already is a mapping of names to values.

    Only keys that start with `prefix` are kept, and the prefix is removed from them (so
    `prefix='model.gaussians_nodes.background.'` yields `positions`, `rotations`, ...)."""
    sd = obj.get("state_dict") if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping):
        sd = obj
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise SceneFormatError(f"checkpoint has no state_dict mapping (got {type(obj).__name__})")
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
