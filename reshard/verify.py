"""Checksums of canonical tensors, computed piecewise and in a distributed way.

A tensor's checksum is ``sum_i bits(x_i) * w_k(i) mod P`` for two position weights ``w_k``
(``P = 2^31 - 1``), where ``i`` is the flat canonical index and ``bits`` the raw bit pattern.
It adds up over any split of the tensor into rectangles, so the source (as its files slice it)
and the output (as *its* files slice it) can be summed by different ranks in different pieces
and still be compared exactly; a changed, moved or missing element changes it.

:func:`index_checksums` reads every canonical element of an index exactly once (its slices),
sharing the slices over the ranks, and returns one checksum pair per canonical tensor.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import dist as rdist

P = (1 << 31) - 1
_MULT = (2654435761 % P, 40503 * 65599 % P)
_ADD = (97531, 12345)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def rect_checksum(t: torch.Tensor, shape, c_off) -> Tuple[int, int]:
    """Contribution of rectangle ``t`` at ``c_off`` of a canonical tensor of ``shape``."""
    t = t.contiguous()
    bits = t.view(_BITS[t.element_size()]).reshape(-1).to(torch.int64)
    if t.element_size() == 8:
        bits = (bits & 0x7FFFFFFF) ^ ((bits >> 31) & 0x7FFFFFFF) ^ (bits >> 62)
    bits = bits % P
    out = []
    for k in range(2):
        out_k = 0
        # chunks keep the int64 temporaries small on big tensors
        n = bits.numel()
        step = 1 << 22
        for s in range(0, n, step):
            idx = _flat_index_slice(shape, c_off, t.shape, s, min(n, s + step))
            w = (idx % P * _MULT[k] + _ADD[k]) % P
            out_k = (out_k + int(((bits[s:s + step] * w) % P).sum())) % P
        out.append(out_k)
    return out[0], out[1]


def _flat_index_slice(shape, c_off, size, lo, hi) -> torch.Tensor:
    """Flat canonical indices of elements ``lo:hi`` (row-major) of the rectangle."""
    pos = torch.arange(lo, hi, dtype=torch.int64)
    idx = torch.zeros_like(pos)
    stride = 1
    for d in reversed(range(len(shape))):
        coord = pos % size[d] + c_off[d]
        pos = pos // size[d]
        idx += coord * stride
        stride *= shape[d]
    return idx


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
            acc[0], acc[1] = (acc[0] + c[0]) % P, (acc[1] + c[1]) % P
    finally:
        reader.close()
    total: Dict[str, List[int]] = {}
    for part in rdist.gather_objects(sums):
        for name, (a, b) in part.items():
            acc = total.setdefault(name, [0, 0])
            acc[0], acc[1] = (acc[0] + a) % P, (acc[1] + b) % P
    return {k: (v[0], v[1]) for k, v in total.items()}, nbytes


def _read_slice(reader, sl) -> torch.Tensor:
    from .run import TRANSFORMS

    lead = len(sl.s_off) - len(sl.size)
    size = (1,) * lead + tuple(sl.size)
    if sl.transform is None:
        return reader.read(sl.stored, sl.s_off, size).reshape(sl.size).clone()
    name, block = sl.transform
    r0 = sl.s_off[lead]
    a, b = r0 // block * block, -(-(r0 + sl.size[0]) // block) * block
    off = sl.s_off[:lead] + (a,) + tuple(sl.s_off[lead + 1:])
    t = reader.read(sl.stored, off, (1,) * lead + (b - a,) + tuple(sl.size[1:])).reshape(
        (b - a,) + tuple(sl.size[1:]))
    return TRANSFORMS[name](t, block)[r0 - a:r0 - a + sl.size[0]]


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
