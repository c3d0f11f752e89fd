"""Reading stored bytes: the raw reader every format's reader builds on, and :func:`read_rect`
for rectangles stored with a row permutation or transposed.

The vocabulary (:class:`~reshard.types.StoredTensor`, :class:`~reshard.types.SourceIndex`, ...)
lives in :mod:`reshard.types`; it is re-exported here for the format modules. The verbs every
format provides are listed in :mod:`reshard.formats`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from typing import Dict, Optional

import torch

from ..errors import SourceError
from ..types import (FP8_BLOCKS, TRANSPOSE, Shape, SourceIndex, SourceSlice, StoredTensor, contiguous_run,  # noqa: F401
                     contiguous_start, stored_offset, stored_size)


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

    def _map(self, stored: StoredTensor) -> mmap.mmap:
        m = self._maps.get(stored.file)
        if m is None:
            m = self._maps[stored.file] = mmap.mmap(self._fd(stored.file), 0, access=mmap.ACCESS_READ)
        if stored.offset + stored.nbytes > len(m):
            raise SourceError(f"{os.path.join(self.root, stored.file)} is shorter than {stored.key} needs "
                              "(truncated after the run started)")
        return m

    def _mapped(self, stored: StoredTensor) -> torch.Tensor:
        with warnings.catch_warnings():  # a read-only buffer: we only read from it
            warnings.simplefilter("ignore")
            raw = torch.frombuffer(self._map(stored), dtype=torch.uint8, count=stored.nbytes, offset=stored.offset)
        return raw.view(stored.dtype).reshape(stored.shape)

    @contextlib.contextmanager
    def view(self, stored: StoredTensor, offsets, sizes):
        """The rectangle as a read-only view of the file's pages (no copy; valid inside the
        ``with``), when it is one run of bytes; else None. The pages are dropped from this
        process's RSS afterwards (they stay in the page cache)."""
        run = contiguous_run(stored.shape, tuple(offsets), tuple(sizes))
        if run is None or stored.nbytes == 0:
            yield None
            return
        item = stored.dtype.itemsize
        t = self._mapped(stored).reshape(-1)[run[0]:run[0] + run[1]].reshape(tuple(sizes))
        try:
            yield t
        finally:
            del t
            self._drop(stored, stored.offset + run[0] * item, stored.offset + (run[0] + run[1]) * item)

    def _drop(self, stored: StoredTensor, a: int, b: int) -> None:
        """Unmap bytes ``[a, b)`` of ``stored``'s file from this process (not from the page cache)."""
        m = self._maps.get(stored.file)
        a = a // mmap.PAGESIZE * mmap.PAGESIZE
        if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED") and b > a:
            m.madvise(mmap.MADV_DONTNEED, a, min(b, len(m)) - a)

    def _read_strided(self, stored: StoredTensor, offsets, sizes) -> torch.Tensor:
        full = self._mapped(stored)
        idx = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        out = full[idx].clone()
        del full
        # The touched pages of a file mapping count in this process's RSS until unmapped: drop
        # them from the mapping (they stay in the page cache), so column reads cost no memory.
        first = contiguous_start(stored.shape, offsets)
        last = contiguous_start(stored.shape, tuple(o + s - 1 for o, s in zip(offsets, sizes))) + 1
        item = stored.dtype.itemsize
        self._drop(stored, stored.offset + first * item, stored.offset + last * item)
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


def read_rect(reader, stored: StoredTensor, s_off, size, transform=None,
              into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Canonical rectangle ``size`` stored at ``s_off`` (which may have leading axes) of ``stored``.
    With a row ``transform``, the whole blocks the rectangle touches are read, put in canonical
    order and sliced. ``into``: scratch space for a plain read (the result may alias it)."""
    from ..transforms import ROW_PERMUTATIONS

    lead = len(s_off) - len(size)
    if transform is None:
        return reader.read(stored, s_off, (1,) * lead + tuple(size), into=into).reshape(size)
    if transform == TRANSPOSE:
        ssz = stored_size(size, transform)
        return reader.read(stored, s_off, (1,) * lead + ssz).reshape(ssz).t().contiguous()
    if transform[0] == FP8_BLOCKS:
        return dequantize_rect(reader, stored, s_off, size, transform[1])
    name, block = transform
    r0 = s_off[lead]
    a, b = r0 // block * block, -(-(r0 + size[0]) // block) * block
    off = tuple(s_off[:lead]) + (a,) + tuple(s_off[lead + 1:])
    t = reader.read(stored, off, (1,) * lead + (b - a,) + tuple(size[1:])).reshape((b - a,) + tuple(size[1:]))
    return ROW_PERMUTATIONS[name](t, block)[r0 - a:r0 - a + size[0]]


def dequantize_rect(reader, stored: StoredTensor, s_off, size, scales) -> torch.Tensor:
    """Rectangle ``size`` at ``s_off`` of a block-scaled FP8 weight, as float32 values:
    ``fp8.float() * scale`` with the scale of each element's block (the rectangle's own blocks
    of ``_scale_inv`` are read, never the whole tensor)."""
    (r0, c0), (nr, nc), (br, bc) = s_off[-2:], size[-2:], scales.block
    w = reader.read(stored, s_off, (1,) * (len(s_off) - 2) + (nr, nc)).reshape(nr, nc).float()
    a, b = r0 // br, (r0 + nr - 1) // br + 1
    c, d = c0 // bc, (c0 + nc - 1) // bc + 1
    s = reader.read(scales.scale, (a, c), (b - a, d - c)).reshape(b - a, d - c).float()
    s = s.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)[r0 - a * br:r0 - a * br + nr,
                                                                    c0 - c * bc:c0 - c * bc + nc]
    return (w * s).reshape(size)
