"""Hugging Face safetensors checkpoints (FORMATS.md §1).

``config.json`` plus ``model.safetensors`` or shards with ``model.safetensors.index.json``.
The index is built from the safetensors headers alone (8-byte length + JSON), so it is fast
on any size and finds truncated or missing shards before any data moves. Reads are slices
through ``safetensors.safe_open`` (memory-mapped; only the requested bytes are touched).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Optional

import torch

from ..errors import SourceError
from ..spec import read_hf_config
from .base import SourceIndex, SourceSlice, StoredTensor

NAME = "hf"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def detect(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, INDEX_FILE)) or os.path.isfile(os.path.join(path, SINGLE_FILE)))


def _weight_files(path: str) -> Dict[str, Optional[list]]:
    """File -> names the index promises in it (None for a single unindexed file)."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise SourceError(f"{index_path} is not a valid safetensors index ({e})") from None
        files: Dict[str, list] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        return files
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return {SINGLE_FILE: None}
    bins = [f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin")]
    if bins:
        raise SourceError(f"{path} holds only {bins[0]}-style torch pickles; convert them to safetensors "
                          "first (transformers: save_pretrained(safe_serialization=True))")
    raise SourceError(f"{path} has config.json but no {SINGLE_FILE} or {INDEX_FILE}")


def read_header(file_path: str) -> Dict[str, StoredTensor]:
    """Parse a safetensors header and check the file holds every byte it promises."""
    rel = os.path.basename(file_path)
    try:
        size = os.path.getsize(file_path)
        with open(file_path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError(f"{file_path} is truncated ({size} bytes): no safetensors header")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > size - 8:
                raise SourceError(f"{file_path} is truncated: header says {hlen} bytes, file has {size}")
            header = json.loads(f.read(hlen))
    except FileNotFoundError:
        raise SourceError(f"shard {file_path} is named by the index but does not exist; "
                          "copy the complete checkpoint (every shard) and retry") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{file_path} cannot be read as safetensors: {e}") from None
    header.pop("__metadata__", None)
    base = 8 + hlen
    out, end = {}, base
    for key, info in header.items():
        start, stop = info["data_offsets"]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise SourceError(f"{file_path}: tensor {key} has unsupported dtype {info['dtype']}")
        out[key] = StoredTensor(rel, key, tuple(info["shape"]), dtype, base + start)
        end = max(end, base + stop)
    if end > size:
        raise SourceError(f"{file_path} is truncated: its header needs {end} bytes but the file has {size}; "
                          "the copy or download was interrupted - fetch this shard again")
    return out


def read_index(path: str) -> SourceIndex:
    spec = read_hf_config(path)
    files = _weight_files(path)
    slices, shapes, dtypes, sizes = {}, {}, {}, {}
    for fname, promised in sorted(files.items()):
        stored = read_header(os.path.join(path, fname))
        sizes[fname] = os.path.getsize(os.path.join(path, fname))
        if promised is not None:
            absent = sorted(set(promised) - set(stored))
            if absent:
                raise SourceError(f"{os.path.join(path, fname)} lacks {len(absent)} tensor(s) its index "
                                  f"names: {absent[:8]}{' ...' if len(absent) > 8 else ''}")
        for key, st in stored.items():
            if promised is not None and key not in promised:
                continue  # the index is the authority on which file holds a name
            if key in slices:
                raise SourceError(f"tensor {key} appears in two files of {path}")
            zero = (0,) * len(st.shape)
            slices[key] = [SourceSlice(st, zero, zero, st.shape)]
            shapes[key] = st.shape
            dtypes[key] = st.dtype
    return SourceIndex(NAME, path, spec, shapes, dtypes, slices, sizes)


def _row_span(stored: StoredTensor, offsets, sizes):
    """Byte range of a rectangle that is a run of whole rows, else None."""
    if tuple(offsets[1:]) != (0,) * (len(offsets) - 1) or tuple(sizes[1:]) != tuple(stored.shape[1:]):
        return None
    row = stored.dtype.itemsize
    for s in stored.shape[1:]:
        row *= s
    return stored.offset + offsets[0] * row, sizes[0] * row if sizes else row


class Reader:
    """Reads rectangles of safetensors tensors.

    Runs of whole rows (every slice the torch_dist planner asks for) are read with ``pread``
    straight into a fresh tensor: one copy, and no memory mapping whose touched pages would
    count against the rank's memory for the rest of the run. Other rectangles go through
    ``safetensors.safe_open(...).get_slice``.
    """

    def __init__(self, root: str):
        self.root = root
        self._fds = {}
        self._handles = {}

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(os.path.join(self.root, file), os.O_RDONLY)
        return fd

    def read(self, stored: StoredTensor, offsets, sizes, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The rectangle as a tensor. ``into`` (uint8, large enough) is scratch space to read into
        instead of a fresh allocation; the result then aliases it."""
        span = _row_span(stored, offsets, sizes)
        if span is None:
            return self._read_slice(stored, offsets, sizes)
        start, n = span
        buf = into[:n] if into is not None and into.numel() >= n else torch.empty(n, dtype=torch.uint8)
        view, fd, done = memoryview(buf.numpy()), self._fd(stored.file), 0
        while done < n:
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise SourceError(f"{os.path.join(self.root, stored.file)} ended while reading {stored.key}: "
                                  "the file was truncated after the run started")
            done += got
        return buf.view(stored.dtype).reshape(tuple(sizes))

    def span(self, stored: StoredTensor, offsets, sizes):
        """``(fd, byte offset, nbytes)`` when the rectangle is one run of bytes of its file."""
        span = _row_span(stored, offsets, sizes)
        return None if span is None else (self._fd(stored.file), span[0], span[1])

    def _read_slice(self, stored: StoredTensor, offsets, sizes) -> torch.Tensor:
        from safetensors import safe_open

        h = self._handles.get(stored.file)
        if h is None:
            h = self._handles[stored.file] = safe_open(os.path.join(self.root, stored.file), framework="pt")
        idx = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        return h.get_slice(stored.key)[idx]

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()
