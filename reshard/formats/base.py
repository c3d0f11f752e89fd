"""What every format provides, and the source index the planner works from.

A format module offers the same verbs (DESIGN.md "Format"):

* ``detect(path) -> bool`` - is this directory in my format (metadata only)?
* ``read_index(path, ...) -> SourceIndex`` - spec and where every canonical tensor lives.
* a reader: ``read(stored, offsets, sizes) -> Tensor`` for one rectangle of a stored tensor,
  and ``span(stored, offsets, sizes) -> (fd, offset, nbytes) | None`` when that rectangle is
  one run of raw bytes in its file (the writer may then copy it without reading it).
* a writer: ``targets(...)`` (the target tensors and how canonical rectangles land in
  them), and ``write(...)`` run collectively by every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
import mmap
import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import SourceError

from ..spec import ModelSpec

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as stored in one source file."""

    file: str  # path relative to the source root
    key: str  # name inside the file
    shape: Shape
    dtype: torch.dtype
    offset: int = 0  # byte offset of its data in the file (read ordering and locality)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SourceSlice:
    """Canonical rectangle ``[c_off, c_off+size)`` is stored at ``s_off`` of ``stored``.

    ``s_off`` may have leading dimensions the canonical tensor lacks (a stacked layer axis,
    size 1 there). ``transform`` names a row permutation the stored rows carry relative to
    the canonical ones, applied per block of ``transform[1]`` stored rows counted from row 0
    of ``stored`` (Meta's RoPE order: ``("rope_meta_to_hf", head_dim)``).
    """

    stored: StoredTensor
    c_off: Shape
    s_off: Shape
    size: Shape
    transform: Optional[Tuple[str, int]] = None


@dataclass
class SourceIndex:
    """Metadata of a source checkpoint: no tensor data."""

    format: str
    root: str
    spec: ModelSpec
    shapes: Dict[str, Shape]  # canonical name -> canonical shape
    dtypes: Dict[str, torch.dtype]
    slices: Dict[str, List[SourceSlice]]  # canonical name -> where its pieces are
    files: Dict[str, int] = field(default_factory=dict)  # relative file -> size in bytes
    iteration: Optional[int] = None
    source_layout: Optional[object] = None  # the Layout a Megatron source was saved at
    guessed: Tuple[str, ...] = ()  # spec fields the format cannot record (a preset may set them)
    # stored tensors the format's own index does not name (file -> names): never read, always reported
    unlisted: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of canonical data in the source (what a conversion reads)."""
        total = 0
        for sl in self.slices.values():
            for s in sl:
                n = s.stored.dtype.itemsize
                for x in s.size:
                    n *= x
                total += n
        return total


def contiguous_start(shape: Shape, index: Shape) -> int:
    """Element offset of ``index`` in a C-order tensor of ``shape``."""
    start, stride = 0, 1
    for o, n in zip(reversed(index), reversed(shape)):
        start += o * stride
        stride *= n
    return start


def contiguous_run(shape: Shape, offsets: Shape, sizes: Shape) -> Optional[Tuple[int, int]]:
    """``(first element, numel)`` when the rectangle is one contiguous run of a C-order
    tensor of ``shape``, else None."""
    d = 0
    while d < len(sizes) - 1 and sizes[d] == 1:
        d += 1
    for e in range(d + 1, len(sizes)):
        if offsets[e] != 0 or sizes[e] != shape[e]:
            return None
    return contiguous_start(shape, offsets), math.prod(sizes)


class RawReader:
    """Reads rectangles of tensors stored as contiguous C-order bytes at ``StoredTensor.offset``
    of their file (safetensors, torch.save records, DCP chunks).

    A rectangle that is one run of bytes (whole rows - what most pieces are) is read with
    ``preadv`` straight into a tensor: one copy, no mapping whose touched pages would stay
    charged to the rank. Other rectangles (column blocks) are copied out of a read-only
    memory map, touching only the pages they cover.
    """

    def __init__(self, root: str):
        self.root = root
        self._fds: Dict[str, int] = {}
        self._maps: Dict[str, mmap.mmap] = {}

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(os.path.join(self.root, file), os.O_RDONLY)
        return fd

    def read(self, stored: StoredTensor, offsets, sizes, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The rectangle as a tensor. ``into`` (uint8, large enough) is scratch space to read into
        instead of a fresh allocation; the result then aliases it."""
        run = contiguous_run(stored.shape, tuple(offsets), tuple(sizes))
        if run is None:
            return self._read_strided(stored, offsets, sizes)
        first, numel = run
        item = stored.dtype.itemsize
        n, start = numel * item, stored.offset + first * item
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
        run = contiguous_run(stored.shape, tuple(offsets), tuple(sizes))
        if run is None:
            return None
        item = stored.dtype.itemsize
        return self._fd(stored.file), stored.offset + run[0] * item, run[1] * item

    def _read_strided(self, stored: StoredTensor, offsets, sizes) -> torch.Tensor:
        m = self._maps.get(stored.file)
        if m is None:
            m = self._maps[stored.file] = mmap.mmap(self._fd(stored.file), 0, access=mmap.ACCESS_READ)
        if stored.offset + stored.nbytes > len(m):
            raise SourceError(f"{os.path.join(self.root, stored.file)} is shorter than {stored.key} needs "
                              "(truncated after the run started)")
        with warnings.catch_warnings():  # a read-only buffer: we only copy out of it
            warnings.simplefilter("ignore")
            raw = torch.frombuffer(m, dtype=torch.uint8, count=stored.nbytes, offset=stored.offset)
        full = raw.view(stored.dtype).reshape(stored.shape)
        idx = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        out = full[idx].clone()
        del full, raw
        # The touched pages of a file mapping count in this process's RSS until unmapped: drop
        # them from the mapping (they stay in the page cache), so column reads cost no memory.
        first = contiguous_start(stored.shape, offsets)
        last = contiguous_start(stored.shape, tuple(o + s - 1 for o, s in zip(offsets, sizes))) + 1
        item = stored.dtype.itemsize
        a = (stored.offset + first * item) // mmap.PAGESIZE * mmap.PAGESIZE
        b = stored.offset + last * item
        if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED") and b > a:
            m.madvise(mmap.MADV_DONTNEED, a, b - a)
        return out

    def close(self):
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it; the mapping goes when that tensor does
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


TRANSPOSE = ("transpose", 0)  # a 2-D slice stored transposed (Megatron's old GroupedMLP weight1/weight2)


def stored_offset(s_off, c_delta, transform=None) -> Shape:
    """``s_off`` moved by ``c_delta`` canonical elements (swapped for a transposed slice)."""
    lead = len(s_off) - len(c_delta)
    if transform == TRANSPOSE:
        c_delta = tuple(reversed(c_delta))
    return tuple(s_off[:lead]) + tuple(s + d for s, d in zip(s_off[lead:], c_delta))


def stored_size(size, transform=None) -> Shape:
    return tuple(reversed(size)) if transform == TRANSPOSE else tuple(size)


def read_rect(reader, stored: StoredTensor, s_off, size, transform=None) -> torch.Tensor:
    """Canonical rectangle ``size`` stored at ``s_off`` (which may have leading axes) of ``stored``.
    With a row ``transform``, the whole blocks the rectangle touches are read, put in canonical
    order and sliced."""
    from ..transforms import ROW_PERMUTATIONS

    lead = len(s_off) - len(size)
    if transform is None:
        return reader.read(stored, s_off, (1,) * lead + tuple(size)).reshape(size)
    if transform == TRANSPOSE:
        ssz = stored_size(size, transform)
        return reader.read(stored, s_off, (1,) * lead + ssz).reshape(ssz).t().contiguous()
    name, block = transform
    r0 = s_off[lead]
    a, b = r0 // block * block, -(-(r0 + size[0]) // block) * block
    off = tuple(s_off[:lead]) + (a,) + tuple(s_off[lead + 1:])
    t = reader.read(stored, off, (1,) * lead + (b - a,) + tuple(size[1:])).reshape((b - a,) + tuple(size[1:]))
    return ROW_PERMUTATIONS[name](t, block)[r0 - a:r0 - a + size[0]]
