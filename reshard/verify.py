"""Checksums of canonical tensors, computed piecewise and in a distributed way.

The bit pattern of a tensor, read as signed 16-bit units (bytes for 1-byte dtypes), is hashed
with position weights: ``row_r = sum_v unit[r, v] * w(v)`` over the units ``v`` of row ``r``
(exact in int64: units < 2^15, weights < 2^31), then ``c_k = sum_r row_r * u_k(r) mod P_k``
for two primes. Both sums add up over any split of the tensor into rectangles, so the source
(as its files slice it) and the output (as *its* files slice it) can be summed by different
ranks in different pieces and still be compared exactly. A single changed element always
changes both (every factor is non-zero mod a prime); a moved one changes its weights.

:func:`index_checksums` reads every canonical element of an index exactly once (its slices),
sharing the slices over the ranks, and returns one checksum pair per canonical tensor.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import dist as rdist
from .formats.base import read_rect

PRIMES = ((1 << 31) - 1, 1_000_000_007)
P = PRIMES[0]
_ROW = ((40503, 97), (69069, 12345))
BLOCK_ELEMENTS = 1 << 22
COLS = 1 << 16


def _col_weights(v: np.ndarray) -> np.ndarray:
    return (v * 2654435761 + 1013904223) % PRIMES[0] + 1  # in [1, 2^31): never zero


def rect_checksum(t: torch.Tensor, shape, c_off) -> Tuple[int, int]:
    """Contribution of rectangle ``t`` at ``c_off`` of a canonical tensor of ``shape`` (1-D or 2-D)."""
    t = t.contiguous()
    if t.dim() == 1:  # a vector is one row
        t, c_off = t.reshape(1, -1), (0,) + tuple(c_off)
    assert t.dim() == 2, "canonical tensors have at most 2 dimensions"
    rows, cols = t.shape
    if t.element_size() == 1:
        units, per = t.view(torch.uint8).numpy(), 1
    else:
        per = t.element_size() // 2
        units = t.view(torch.int16).numpy().reshape(rows, cols * per)
    v = (np.arange(c_off[1], c_off[1] + cols, dtype=np.int64)[:, None] * per + np.arange(per)[None, :]).reshape(-1)
    w = _col_weights(v)
    r = np.arange(c_off[0], c_off[0] + rows, dtype=np.int64)
    out = [0, 0]
    width = units.shape[1]
    step = max(1, BLOCK_ELEMENTS // max(1, width))
    for a in range(0, rows, step):
        row_mod = [0, 0]
        for b in range(0, width, COLS):  # exact in int64: |unit| < 2^15, w < 2^31, <= 2^16 units
            part = units[a:a + step, b:b + COLS].astype(np.int64) @ w[b:b + COLS]
            row_mod = [(acc + part % p) % p for acc, p in zip(row_mod, PRIMES)]
        for k, (p, (m, c)) in enumerate(zip(PRIMES, _ROW)):
            u = (r[a:a + step] * m + c) % p + 1
            out[k] = (out[k] + int((row_mod[k] * u % p).sum())) % p
    return out[0], out[1]


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
    sums: Dict[str, List[int]] = {}
    nbytes = 0
    try:
        for name, sl in mine:
            t = _read_slice(reader, sl)
            nbytes += t.nbytes
            if dtype_of is not None and t.dtype != dtype_of(name):
                t = t.to(dtype_of(name))
            c = rect_checksum(t, index.shapes[name], sl.c_off)
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


def _read_slice(reader, sl) -> torch.Tensor:
    return read_rect(reader, sl.stored, sl.s_off, sl.size, sl.transform).clone()


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
