"""Checksums of canonical tensors, computed piecewise and in a distributed way.

The bit pattern of a tensor, read as signed 16-bit units (bytes for 1-byte dtypes), is hashed
with position weights: ``row_r = sum_v unit[r, v] * w(v)`` over the units ``v`` of row ``r``,
then ``c_k = sum_r row_r * u_k(r) mod P_k`` for two primes. Both sums add up over any split of
the tensor into rectangles, so the source (as its files slice it) and the output (as *its*
files slice it) can be summed by different ranks in different pieces and still be compared
exactly. A single changed element always changes both (every factor is non-zero mod a prime);
a moved one changes its weights.

The row sums run at memory speed and stay exact: units are converted to float64 in a reused
block buffer and multiplied by the weights with BLAS ``gemv``. Weights are below 2^22 and a block
holds at most 2^16 units of a row, so every partial sum is an integer below 2^15 * 2^22 * 2^16 =
2^53 in magnitude - exactly representable, whatever order BLAS adds in. (A ``gemm`` with two
weight columns would allow larger weights but runs at a quarter of the speed.)

:func:`index_checksums` reads every canonical element of an index exactly once (its slices),
sharing the slices over the ranks, and returns one checksum pair per canonical tensor.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import dist as rdist
from .formats.base import read_rect

PRIMES = ((1 << 31) - 1, 1_000_000_007)
P = PRIMES[0]
_ROW = ((40503, 97), (69069, 12345))
W_MOD = (1 << 22) - 3  # weights in [1, 2^22)
BLOCK = 1 << 20  # units per block: 8 MiB of float64, reused
COLS = 1 << 16  # units of a row per block: keeps every partial sum below 2^53


def col_weights(v: np.ndarray) -> np.ndarray:
    return (v * 2654435761 + 1013904223) % W_MOD + 1  # in [1, 2^22): never zero mod either prime


def units_of(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(units [rows, cols * per], per)``: the bit pattern of a 2-D tensor as signed 16-bit units
    (unsigned bytes for 1-byte dtypes), ``per`` units to an element."""
    rows, cols = t.shape
    if t.element_size() == 1:
        return t.view(torch.uint8), 1
    per = t.element_size() // 2
    return t.view(torch.int16).reshape(rows, cols * per), per


class Checksummer:
    """:func:`rect_checksum` with one block buffer for every rectangle it sums."""

    def __init__(self):
        self._buf = torch.empty(0, dtype=torch.float64)

    def __call__(self, t: torch.Tensor, c_off) -> Tuple[int, int]:
        """Contribution of rectangle ``t`` (1-D or 2-D) at ``c_off`` of its canonical tensor."""
        t = t.contiguous()
        if t.dim() == 1:  # a vector is one row
            t, c_off = t.reshape(1, -1), (0,) + tuple(c_off)
        assert t.dim() == 2, "canonical tensors have at most 2 dimensions"
        units, per = units_of(t)
        rows, width = units.shape
        w = torch.from_numpy(col_weights(np.arange(c_off[1] * per, c_off[1] * per + width, dtype=np.int64))
                             .astype(np.float64))
        cb = min(width, COLS)
        rb = max(1, BLOCK // max(1, cb))
        if self._buf.numel() < min(rows, rb) * cb:
            self._buf = torch.empty(min(rows, rb) * cb, dtype=torch.float64)
        sums = [torch.zeros(rows, dtype=torch.int64) for _ in PRIMES]
        for a in range(0, rows, rb):
            n = min(rb, rows - a)
            for b in range(0, width, cb):
                m = min(cb, width - b)
                x = self._buf[:n * m].view(n, m)
                x.copy_(units[a:a + n, b:b + m])
                part = torch.mv(x, w[b:b + m]).to(torch.int64)  # exact integers (see the module doc)
                for k, p in enumerate(PRIMES):
                    sums[k][a:a + n] = (sums[k][a:a + n] + part.remainder(p)).remainder_(p)
        r = torch.arange(c_off[0], c_off[0] + rows, dtype=torch.int64)
        out = []
        for k, (p, (mul, add)) in enumerate(zip(PRIMES, _ROW)):
            u = (r * mul + add) % p + 1
            out.append(int((sums[k] * u % p).sum()) % p)  # each term < 2^31, rows < 2^32
        return out[0], out[1]


def rect_checksum(t: torch.Tensor, shape, c_off) -> Tuple[int, int]:
    """Contribution of rectangle ``t`` at ``c_off`` of a canonical tensor of ``shape`` (1-D or 2-D)."""
    return Checksummer()(t, c_off)


def index_checksums(index, reader_factory: Callable[[str], object], dtype_of: Optional[Callable] = None,
                    names: Optional[List[str]] = None) -> Tuple[Dict[str, Tuple[int, int]], int]:
    """``({canonical name: (c1, c2)}, bytes read by this rank)`` over every rank: each slice of
    ``index`` is read by one rank (balanced by bytes), then the sums are added up everywhere.
    ``dtype_of(name)`` casts before summing (a conversion that casts is compared in the target dtype)."""
    work = []
    for name in sorted(names if names is not None else index.slices):
        for sl in index.slices[name]:
            work.append((name, sl))
    world, rank = rdist.world(), rdist.rank()
    load = [0] * world
    mine = []
    for name, sl in sorted(work, key=lambda x: (-math.prod(x[1].size), x[0], x[1].c_off)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += math.prod(sl.size)
        if r == rank:
            mine.append((name, sl))
    mine.sort(key=lambda x: (x[1].stored.file, x[1].stored.offset, x[1].s_off))
    reader = reader_factory(index.root)
    checksum = Checksummer()
    scratch = torch.empty(0, dtype=torch.uint8)  # one read buffer for every slice: no clone, no fresh pages
    sums: Dict[str, List[int]] = {}
    nbytes = 0
    try:
        for name, sl in mine:
            lead = len(sl.s_off) - len(sl.size)
            cast = dtype_of is not None and sl.stored.dtype != dtype_of(name)
            view = reader.view(sl.stored, sl.s_off, (1,) * lead + tuple(sl.size)) \
                if hasattr(reader, "view") and sl.transform is None else contextlib.nullcontext()
            with view as t:
                if t is None:  # a column block, a permuted or transposed slice: read into the buffer
                    n = sl.stored.dtype.itemsize * math.prod(sl.size)
                    if sl.transform is None and scratch.numel() < n:
                        scratch = torch.empty(n, dtype=torch.uint8)
                    t = read_rect(reader, sl.stored, sl.s_off, sl.size, sl.transform, into=scratch)
                t = t.reshape(sl.size)
                nbytes += t.nbytes
                c = checksum(t.to(dtype_of(name)) if cast else t, sl.c_off)
                del t
            acc = sums.setdefault(name, [0, 0])
            acc[0], acc[1] = (acc[0] + c[0]) % PRIMES[0], (acc[1] + c[1]) % PRIMES[1]
    finally:
        reader.close()
    total: Dict[str, List[int]] = {}
    for part in rdist.gather_objects(sums):
        for name, (a, b) in part.items():
            acc = total.setdefault(name, [0, 0])
            acc[0], acc[1] = (acc[0] + a) % PRIMES[0], (acc[1] + b) % PRIMES[1]
    return {k: (v[0], v[1]) for k, v in total.items()}, nbytes


def read_slice(reader, sl) -> torch.Tensor:
    """One source slice as a tensor of its own."""
    return read_rect(reader, sl.stored, sl.s_off, sl.size, sl.transform)


def covered_volume(rects: List[Tuple[Tuple[int, ...], Tuple[int, ...]]]) -> int:
    """Volume of the union of axis-aligned rectangles ``(offset, size)`` (same rank)."""
    if not rects:
        return 0
    if len(rects[0][0]) == 1:
        iv = sorted((o[0], o[0] + s[0]) for o, s in rects)
        vol, end = 0, None
        for a, b in iv:
            if end is None or a >= end:
                vol += b - a
                end = b
            elif b > end:
                vol += b - end
                end = b
        return vol
    cuts = sorted({o[0] for o, _ in rects} | {o[0] + s[0] for o, s in rects})
    vol = 0
    for lo, hi in zip(cuts, cuts[1:]):
        inner = [(o[1:], s[1:]) for o, s in rects if o[0] <= lo and o[0] + s[0] >= hi]
        vol += (hi - lo) * covered_volume(inner)
    return vol
