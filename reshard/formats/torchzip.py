"""Metadata of ``torch.save`` files without loading them, and without running their pickles.

A ``torch.save`` file is a zip archive: ``<name>/data.pkl`` (the object tree; tensors are
references to storages) and one uncompressed entry ``<name>/data/<key>`` per storage. We
unpickle ``data.pkl`` with a *restricted* unpickler (FORMATS.md §4):

* torch's tensor rebuild functions become :class:`TensorRef` (file offset, shape, dtype,
  strides) - no data is read;
* an allow-list of plain types (``OrderedDict``, ``argparse.Namespace``, ``torch.Size``,
  dtypes, layouts, the DCP metadata dataclasses) is resolved to the real thing;
* every other global (Megatron enums, TE classes, ``io.BytesIO`` ...) becomes an inert
  :class:`Opaque` placeholder that only records its arguments. Nothing outside the allow-list
  is ever imported or called, so a hostile pickle cannot run code and Megatron is never needed.

The same works on a record embedded in a larger file (DCP ``.distcp`` files are
concatenated ``torch.save`` records): pass the record's byte range.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import SourceError


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor inside a torch.save file: where its bytes are, no data."""

    storage: StorageRef
    storage_offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    data_offset: int = -1  # absolute byte offset of the storage in the file (filled after parsing)

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def contiguous(self) -> bool:
        expect, acc = [], 1
        for s in reversed(self.shape):
            expect.append(acc)
            acc *= s
        return all(st == e for st, e, s in zip(self.stride, reversed(expect), self.shape) if s > 1)

    @property
    def offset(self) -> int:
        """Absolute file offset of element 0 of this tensor."""
        return self.data_offset + self.storage_offset * self.dtype.itemsize


class Opaque:
    """Stand-in for a global outside the allow-list: records how it was built, runs nothing."""

    module = name = ""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        inner = ", ".join(map(repr, self.args))
        return f"<{self.module}.{self.name}({inner})>"

    def __eq__(self, other):
        return (type(other).__name__ == type(self).__name__ and getattr(other, "module", None) == self.module
                and getattr(other, "args", None) == self.args and getattr(other, "state", None) == self.state)

    def __hash__(self):
        return hash((self.module, self.name))

    def __reduce__(self):  # instances travel between ranks; the generated classes are rebuilt there
        return _make_opaque, (self.module, self.name, self.args, self.kwargs, self.state)

    # Enums pickled by value compare by their value.
    @property
    def value(self):
        return self.args[0] if self.args else None


_OPAQUE: Dict[Tuple[str, str], type] = {}


def _opaque(module: str, name: str) -> type:
    cls = _OPAQUE.get((module, name))
    if cls is None:
        cls = _OPAQUE[(module, name)] = type(name, (Opaque,), {"module": module, "name": name})
    return cls


def _make_opaque(module, name, args, kwargs, state):
    obj = _opaque(module, name)(*args, **kwargs)
    obj.state = state
    return obj


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    return TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


_TORCH_FUNCS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}
_PLAIN = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch", "Size"): torch.Size,
}
# Data classes of DCP's .metadata file: plain records, safe to construct.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_DCP_NAMES = {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
              "TensorProperties", "MetadataIndex", "_StorageInfo", "StorageMeta", "_MEM_FORMAT_ENCODING"}


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
    "Float8_e4m3fnStorage": torch.float8_e4m3fn, "Float8_e5m2Storage": torch.float8_e5m2,
}


def _codecs_encode(s, encoding="latin1"):  # how protocol-2 pickles spell bytes
    return s.encode(encoding)


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, storages: Optional[Dict[str, StorageRef]] = None):
        super().__init__(f)
        self.storages = storages if storages is not None else {}

    def find_class(self, module: str, name: str):
        if (module, name) in _TORCH_FUNCS:
            return _TORCH_FUNCS[(module, name)]
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _codecs_encode
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
            if name in _STORAGE_DTYPES:
                return ("storage_type", _STORAGE_DTYPES[name])
        if module in _DCP_MODULES and name in _DCP_NAMES:  # stand-ins: reading needs no DCP import
            from .dcp_metadata import CLASSES

            return CLASSES[name]
        return _opaque(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        dtype = stype[1] if isinstance(stype, tuple) else torch.uint8
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = StorageRef(str(key), dtype, int(numel))
        return ref


def restricted_loads(data: bytes) -> Any:
    """Unpickle plain pickle bytes (no torch storages) with the allow-list."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``[base, base+length)`` of an open file descriptor."""

    def __init__(self, fd: int, base: int, length: int):
        self.fd, self.base, self.length, self.pos = fd, base, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.length + pos)
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.fd, n, self.base + self.pos) if n else b""
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def _data_start(fd: int, base: int, info: zipfile.ZipInfo, where: str) -> int:
    raw = os.pread(fd, _LOCAL_HEADER.size, base + info.header_offset)
    if len(raw) < _LOCAL_HEADER.size:
        raise SourceError(f"{where} is truncated ({info.filename} lies beyond its end)")
    fields = _LOCAL_HEADER.unpack(raw)
    return base + info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]


def parse_record(fd: int, base: int = 0, length: Optional[int] = None, where: str = "") -> Any:
    """The object tree of the torch.save record at ``[base, base+length)`` of ``fd``; every
    tensor is a :class:`TensorRef` with its absolute ``data_offset`` in the file."""
    if length is None:
        length = os.fstat(fd).st_size - base
    try:
        zf = zipfile.ZipFile(io.BufferedReader(_Window(fd, base, length), buffer_size=1 << 16))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise SourceError(f"{where} is not a readable torch.save file ({e}); is it truncated?") from None
    with zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkl = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise SourceError(f"{where} is a zip file but not a torch.save archive (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        storages: Dict[str, StorageRef] = {}
        try:
            # Read raw: records may be written without zip CRC32 (torch's compute_crc32=False).
            info = infos[pkl[0]]
            start = _data_start(fd, base, info, where)
            raw = os.pread(fd, info.file_size, start)
            if len(raw) < info.file_size:
                raise SourceError(f"{where} is truncated (in data.pkl)")
            obj = RestrictedUnpickler(io.BytesIO(raw), storages).load()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError) as e:
            raise SourceError(f"{where}: cannot read its pickled object tree ({type(e).__name__}: {e})") from None
        offsets = {}
        for key, st in storages.items():
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise SourceError(f"{where}: storage {key} is referenced but absent (truncated or damaged file)")
            if info.compress_type != zipfile.ZIP_STORED:
                raise SourceError(f"{where}: storage {key} is compressed; torch.save never does that")
            start = _data_start(fd, base, info, where)
            if info.file_size < st.numel * st.dtype.itemsize:
                raise SourceError(f"{where}: storage {key} holds {info.file_size} bytes, its tensors need "
                                  f"{st.numel * st.dtype.itemsize}")
            if start + info.file_size > base + length:
                raise SourceError(f"{where} is truncated: storage {key} ends at byte {start + info.file_size}, "
                                  f"the file has {base + length}")
            offsets[key] = start
    return _place(obj, offsets)


def _place(obj, offsets):
    if isinstance(obj, TensorRef):
        return TensorRef(obj.storage, obj.storage_offset, obj.shape, obj.stride, offsets[obj.storage.key])
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _place(v, offsets)
        return out
    if isinstance(obj, list):
        return [_place(v, offsets) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_place(v, offsets) for v in obj)
    return obj


def read_scalar(path: str, ref: TensorRef) -> float:
    """The value of a one-element tensor of a torch.save file (an Adam ``step``), from its bytes alone."""
    with open(path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.dtype.itemsize)
    return float(torch.frombuffer(bytearray(data), dtype=ref.dtype)[0])


def parse_file(path: str) -> Any:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist") from None
    except OSError as e:
        raise SourceError(f"{path} cannot be opened: {e}") from None
    try:
        return parse_record(fd, 0, None, path)
    finally:
        os.close(fd)


def read_tensor(fd: int, ref: TensorRef) -> torch.Tensor:
    """Materialise a (small) TensorRef."""
    n = ref.storage.numel * ref.dtype.itemsize
    raw = bytearray(os.pread(fd, n, ref.data_offset))
    if len(raw) < n:
        raise SourceError("file ended while reading a tensor (truncated)")
    storage = torch.frombuffer(raw, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    flat = storage.view(ref.dtype)
    return flat.as_strided(ref.shape, ref.stride, ref.storage_offset).clone()


def stored_tensors(root: str, files, select) -> list:
    """Every tensor of the torch.save ``files`` (under ``root``) as ``reshard inspect`` lists it;
    ``select(obj)`` picks the part of each file's object that holds weights."""
    out = []
    for f in files:
        obj = parse_file(os.path.join(root, f))

        def walk(prefix, o):
            if isinstance(o, TensorRef):
                n = o.dtype.itemsize
                for s in o.shape:
                    n *= s
                out.append({"name": prefix, "file": f, "shape": list(o.shape), "dtype": str(o.dtype)[6:],
                            "bytes": n})
            elif isinstance(o, dict):
                for k, v in o.items():
                    walk(f"{prefix}/{k}" if prefix else str(k), v)

        walk("", select(obj) if isinstance(obj, dict) else obj)
    return out
