"""Moving pieces from their reader to their writers, in rounds bounded by the budget.

One code path for gloo (CPU tensors) and NCCL (``device=cuda``): per round and per peer,
the pieces are packed into one flat byte buffer and moved with batched ``isend``/``irecv``.
The plan fixes every size in advance, so receivers allocate exactly and nothing else is
exchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist

from . import dist as rdist
from .plan import Piece, Plan


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buf: torch.Tensor, p: Piece) -> torch.Tensor:
    return buf.view(p.dtype).reshape(p.size)


def run_exchange(plan: Plan, rank: int, read: Callable[[Piece], torch.Tensor], device: torch.device,
                 stats: Dict[str, float], group=None) -> Dict[int, torch.Tensor]:
    """Run every round; return the pieces this rank writes but does not read lazily itself."""
    held: Dict[int, torch.Tensor] = {}
    for arrived in exchange_rounds(plan, rank, read, device, stats, group):
        held.update((p.id, t) for p, t in arrived)
    return held


def exchange_rounds(plan: Plan, rank: int, read: Callable[[Piece], torch.Tensor], device: torch.device,
                    stats: Dict[str, float], group=None) -> Iterator[List[Tuple[Piece, torch.Tensor]]]:
    """The rounds one at a time: after each, the ``(piece, tensor)`` pairs this rank now holds for
    writing (received, or read here for itself and sent to others); pieces that move nowhere are not
    in any round. A consumer that stores what arrived before asking for the next round holds at most
    one round's budget. ``group``: the process group; ``rank`` and the plan's ranks are numbered
    within it. Collective: every rank of the group runs every round."""
    peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    by_round: Dict[int, List[Piece]] = defaultdict(list)
    for p in plan.pieces:
        if p.round >= 0 and (p.reader == rank or rank in p.writers):
            by_round[p.round].append(p)
    for rnd in range(plan.num_rounds):
        sends: Dict[int, List[torch.Tensor]] = defaultdict(list)
        recvs: Dict[int, List[Piece]] = defaultdict(list)
        arrived: List[Tuple[Piece, torch.Tensor]] = []
        err = None
        try:
            for p in by_round.get(rnd, ()):
                if p.reader == rank:
                    t = read(p).to(device)
                    for w in p.writers:
                        if w == rank:
                            arrived.append((p, t))
                        else:
                            sends[w].append(_as_bytes(t))
                else:
                    recvs[p.reader].append(p)
        except Exception as e:  # tell the peers before they wait for bytes that will not come
            err = e
        rdist.agree(err, f"reading for exchange round {rnd}", group=group)
        ops, inbox = [], {}
        for dst in sorted(sends):
            buf = torch.cat(sends[dst]) if len(sends[dst]) > 1 else sends[dst][0]
            ops.append(dist.P2POp(dist.isend, buf, peer(dst), group))
            stats["bytes_sent"] += buf.numel()
        for src in sorted(recvs):
            n = sum(p.out_nbytes for p in recvs[src])
            inbox[src] = torch.empty(n, dtype=torch.uint8, device=device)
            ops.append(dist.P2POp(dist.irecv, inbox[src], peer(src), group))
            stats["bytes_received"] += n
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        for src, pieces in recvs.items():
            at = 0
            for p in pieces:
                arrived.append((p, _from_bytes(inbox[src][at:at + p.out_nbytes], p)))
                at += p.out_nbytes
        yield arrived
