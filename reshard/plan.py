"""The plan: pure, deterministic, no I/O (DESIGN.md "Data flow").

From the source index (where every canonical tensor lives) and the target tensors (how
canonical rectangles land in them) it lists *pieces*: one rectangle read from one stored
source tensor and written to one rectangle of one target tensor. Each piece has exactly one
reader; its writers are the ranks that store it. Pieces whose reader is not a writer move
in *rounds* bounded by the exchange budget. Every rank computes the same plan.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple


from .errors import SourceError
from .types import Piece, Placement, Shape, SourceIndex, TargetTensor, stored_offset  # noqa: F401 (re-exported)


@dataclass
class Plan:
    world: int
    pieces: List[Piece]
    targets: Dict[str, TargetTensor]
    num_rounds: int
    max_piece_bytes: int
    buffer_bytes: int

    def written_by(self, rank: int) -> List[Piece]:
        return [p for p in self.pieces if rank in p.writers]

    def rank_stats(self) -> List[Dict[str, int]]:
        """Per rank: bytes to read, send, receive, write; files opened."""
        stats = [dict(read=0, send=0, recv=0, write=0, pieces_read=0, files=set()) for _ in range(self.world)]
        for p in self.pieces:
            r = stats[p.reader]
            r["read"] += p.src_nbytes
            r["pieces_read"] += 1
            r["files"].add(p.stored.file)
            for w in p.writers:
                stats[w]["write"] += p.written_nbytes
                if w != p.reader:
                    r["send"] += p.out_nbytes
                    stats[w]["recv"] += p.out_nbytes
        for s in stats:
            s["files"] = sorted(s["files"])
        return stats


def _intersect(a_off, a_size, b_off, b_size):
    lo = tuple(max(x, y) for x, y in zip(a_off, b_off))
    hi = tuple(min(x + s, y + t) for x, s, y, t in zip(a_off, a_size, b_off, b_size))
    if any(b <= a for a, b in zip(lo, hi)):
        return None
    return lo, tuple(b - a for a, b in zip(lo, hi))


def _pieces_for(pl: Placement, tgt: TargetTensor, index: SourceIndex) -> List[Piece]:
    out, covered = [], 0
    for sl in index.slices[pl.canonical]:
        hit = _intersect(pl.c_off, pl.c_size, sl.c_off, sl.size)
        if hit is None:
            continue
        off, size = hit
        # A repeated row split over source files (Meta embeddings are split by columns) becomes one
        # repeated piece per part: each broadcasts its columns over the same rows.
        assert pl.repeat == 1 or size[0] == 1
        s_off = stored_offset(sl.s_off, tuple(o - c for o, c in zip(off, sl.c_off)), sl.transform)
        d_off = pl.dst_off[:pl.lead] + tuple(
            d + (o - c) for d, o, c in zip(pl.dst_off[pl.lead:], off, pl.c_off))
        out.append(Piece(-1, pl.canonical, sl.stored, s_off, size, tgt.key, d_off, tgt.dtype, pl.repeat,
                         transform=sl.transform, c_off=off))
        covered += math.prod(size)
    if covered != math.prod(pl.c_size):
        raise SourceError(f"the source holds only {covered} of the {math.prod(pl.c_size)} elements of "
                          f"{pl.canonical} needed for {tgt.key}: the checkpoint is incomplete")
    return out


def _split(p: Piece, max_bytes: int) -> List[Piece]:
    if p.src_nbytes <= max_bytes or p.repeat > 1 or p.size[0] <= 1:
        return [p]
    row_bytes = p.src_nbytes // p.size[0]
    step = max(1, max_bytes // row_bytes)
    out = []
    lead = len(p.dst_off) - len(p.size)
    for r in range(0, p.size[0], step):
        n = min(step, p.size[0] - r)
        s_off = stored_offset(p.s_off, (r,) + (0,) * (len(p.size) - 1), p.transform)
        d_off = p.dst_off[:lead] + (p.dst_off[lead] + r,) + tuple(p.dst_off[lead + 1:])
        c_off = (p.c_off[0] + r,) + tuple(p.c_off[1:]) if p.c_off else ()
        out.append(Piece(-1, p.canonical, p.stored, s_off, (n,) + tuple(p.size[1:]), p.key, d_off, p.dtype,
                         transform=p.transform, c_off=c_off))
    return out


def _assign_readers(pieces: List[Piece], world: int) -> None:
    """Contiguous runs of the source, in file order, of about equal bytes per rank:
    sequential reads, few files per rank, every byte read once."""
    pieces.sort(key=lambda p: (p.stored.file, p.stored.offset, p.s_off, p.key, p.dst_off))
    total = sum(p.src_nbytes for p in pieces) or 1
    acc = 0
    for p in pieces:
        mid = acc + p.src_nbytes / 2
        p.reader = min(world - 1, int(mid * world // total))
        acc += p.src_nbytes
    for i, p in enumerate(pieces):
        p.id = i


def _choose_readers(pieces: List[Piece], readers_of: Callable[[Piece], Sequence[int]]) -> None:
    """Live sources, where several ranks hold the same bytes (data-parallel replicas, TP-replicated
    norms): a writer that holds the piece reads it itself; otherwise the holder that has sent the
    fewest bytes so far sends it (ties: the lowest rank), so replicas share the load."""
    sent: Dict[int, int] = defaultdict(int)
    for p in pieces:
        holders = readers_of(p)
        here = [w for w in p.writers if w in holders]
        p.reader = here[0] if here else min(holders, key=lambda r: (sent[r], r))
        sent[p.reader] += p.out_nbytes * sum(w != p.reader for w in p.writers)


def _assign_rounds(pieces: Sequence[Piece], world: int, budget: int) -> int:
    """Pack moving pieces into rounds where no rank sends + receives more than ``budget``."""
    rounds = 0
    load = [0] * world
    started = False
    for p in pieces:
        movers = [w for w in p.writers if w != p.reader]
        if not movers:
            continue
        need = {p.reader: p.out_nbytes * len(movers)}
        for w in movers:
            need[w] = need.get(w, 0) + p.out_nbytes
        if started and any(load[r] + n > budget for r, n in need.items()):
            rounds += 1
            load = [0] * world
        for r, n in need.items():
            load[r] += n
        started = True
        p.round = rounds
    return rounds + 1 if started else 0


def build_plan(
    index: SourceIndex,
    targets: Sequence[TargetTensor],
    world: int,
    buffer_bytes: int = 512 << 20,
    max_piece_bytes: Optional[int] = None,
    writers_of: Optional[Callable[[Piece, TargetTensor], Tuple[int, ...]]] = None,
    read_by_writer: bool = False,
    readers_of: Optional[Callable[[Piece], Sequence[int]]] = None,
) -> Plan:
    """Plan the whole conversion. ``writers_of`` gives the ranks that must store a piece;
    by default the reader writes it (formats whose chunks may be written by any rank).
    ``read_by_writer``: each piece is read by (the first of) its writers - nothing moves between
    ranks; otherwise readers take contiguous runs of the source and pieces move to their writers.
    ``readers_of``: the ranks that hold a piece's bytes, when not every rank can read every file
    (live state dicts, :mod:`reshard.api`); pieces are then ordered by target tensor, in the order
    of ``targets``, so the rounds complete the targets one after another."""
    assert world >= 1
    by_key = {t.key: t for t in targets}
    pieces: List[Piece] = []
    raw = [p for t in targets for pl in t.placements for p in _pieces_for(pl, t, index)]
    total = sum(p.src_nbytes for p in raw)
    if max_piece_bytes is None:
        max_piece_bytes = max(1 << 20, min(buffer_bytes // 2, math.ceil(total / (8 * world))))
    for p in raw:
        pieces.extend(_split(p, max_piece_bytes))
    if readers_of is None:
        _assign_readers(pieces, world)
        for p in pieces:
            p.writers = tuple(writers_of(p, by_key[p.key])) if writers_of else (p.reader,)
            if read_by_writer:
                p.reader = p.writers[0]
    else:
        order = {t.key: i for i, t in enumerate(targets)}
        pieces.sort(key=lambda p: (order[p.key], p.dst_off))
        for i, p in enumerate(pieces):
            p.id = i
            p.writers = tuple(writers_of(p, by_key[p.key]))
        _choose_readers(pieces, readers_of)
    num_rounds = _assign_rounds(pieces, world, buffer_bytes)
    return Plan(world, pieces, by_key, num_rounds, max_piece_bytes, buffer_bytes)


def check_coverage(plan: Plan, canonical_shapes: Optional[Dict[str, Shape]] = None) -> List[str]:
    """Every target element written exactly once (pieces inside their tensor, no two overlapping,
    volumes adding up) and, given the canonical shapes, every canonical element consumed."""
    from .verify import covered_volume

    problems = []
    by_key: Dict[str, List[Piece]] = defaultdict(list)
    by_canonical: Dict[str, List[Piece]] = defaultdict(list)
    for p in plan.pieces:
        by_key[p.key].append(p)
        by_canonical[p.canonical].append(p)
    for key, t in plan.targets.items():
        ps = by_key.get(key, [])
        vol = sum(math.prod(p.dst_size) for p in ps)
        union = covered_volume([(tuple(p.dst_off), tuple(p.dst_size)) for p in ps])
        if vol != math.prod(t.shape) or union != vol:
            problems.append(f"{key}: pieces cover {union} of {math.prod(t.shape)} elements"
                            + (f" ({vol - union} written twice)" if union != vol else ""))
            continue
        for p in ps:
            if any(o + s > d for o, s, d in zip(p.dst_off, p.dst_size, t.shape)):
                problems.append(f"{key}: piece {p.id} lies outside the tensor")
    for name, shape in (canonical_shapes or {}).items():
        rects = {(tuple(p.c_off), tuple(p.size)) for p in by_canonical.get(name, [])}
        got = covered_volume(sorted(rects))
        if got != math.prod(shape):
            problems.append(f"source tensor {name}: {got} of {math.prod(shape)} elements are used")
    return problems
