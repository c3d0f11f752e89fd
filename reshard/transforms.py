"""Tensor math of the fused and padded layouts, as pure functions.

Two representations of the same facts live here:

* row *segments* (``Segment``): which rows of which canonical tensor land at which rows of a
  fused tensor. The planner uses them to move slices without materialising fused tensors.
* ``merge_*``/``split_*`` functions that build or take apart whole tensors. They are the
  executable definition the segments are tested against (split -> merge round trips), and
  what small in-memory users call.

Shapes: linear weights are ``[out, in]``; biases ``[out]``; all fusing happens on dim 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Segment:
    """Rows ``[src_row, src_row+rows)`` of canonical tensor ``part`` go to rows
    ``[dst_row, dst_row+rows*repeat)`` of the fused tensor (``repeat`` > 1 broadcasts one row)."""

    part: str
    src_row: int
    dst_row: int
    rows: int
    repeat: int = 1


# ---------------------------------------------------------------- fused QKV (grouped by kv head)

def qkv_segments(num_heads: int, num_groups: int, head_dim: int) -> List[Segment]:
    """Fused QKV ``[(nh+2ng)*hd, ...]``: ng blocks of (qpg query heads, 1 key head, 1 value head)."""
    qpg = num_heads // num_groups
    block = (qpg + 2) * head_dim
    segs = []
    for g in range(num_groups):
        base = g * block
        segs.append(Segment("q", g * qpg * head_dim, base, qpg * head_dim))
        segs.append(Segment("k", g * head_dim, base + qpg * head_dim, head_dim))
        segs.append(Segment("v", g * head_dim, base + (qpg + 1) * head_dim, head_dim))
    return segs


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``q [nh*hd, *r]``, ``k``/``v [ng*hd, *r]`` -> fused ``[(nh+2ng)*hd, *r]``."""
    rest = q.shape[1:]
    hd = k.shape[0] // num_groups
    qg = q.reshape(num_groups, -1, *rest)
    kg = k.reshape(num_groups, hd, *rest)
    vg = v.reshape(num_groups, hd, *rest)
    fused = torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)
    assert fused.numel() == q.numel() + k.numel() + v.numel()
    return fused


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv`."""
    rest = fused.shape[1:]
    qpg = num_heads // num_groups
    blocks = fused.reshape(num_groups, (qpg + 2) * head_dim, *rest)
    q, k, v = torch.split(blocks, [qpg * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


# ---------------------------------------------------------------- SwiGLU fc1 = [gate; up]

def gated_segments(ffn: int) -> List[Segment]:
    """Logical (TP-invariant) fc1 ``[W; V]`` = ``[gate; up]``, ``[2F, h]``."""
    return [Segment("gate", 0, 0, ffn), Segment("up", 0, ffn, ffn)]


def gated_tp_rows(ffn: int, tp: int, rank: int) -> List[Tuple[int, int]]:
    """Rows of the logical ``[W; V]`` that TP rank ``rank`` holds, in its local order
    ``[W_r; V_r]`` (plain concatenation of TP shards is *not* the logical tensor)."""
    f = ffn // tp
    return [(rank * f, (rank + 1) * f), (ffn + rank * f, ffn + (rank + 1) * f)]


def merge_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gated(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def gated_tp_shard(fc1: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """The local fc1 of TP rank ``rank`` from the logical ``[W; V]``."""
    ffn = fc1.shape[0] // 2
    return torch.cat([fc1[a:b] for a, b in gated_tp_rows(ffn, tp, rank)], dim=0)


def gated_tp_merge(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`gated_tp_shard` over all ranks."""
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


# ---------------------------------------------------------------- vocab padding

def vocab_segments(vocab_size: int, padded: int) -> List[Segment]:
    """Rows of an embedding padded Megatron-style: padding repeats the last real row."""
    if padded == vocab_size:
        return [Segment("", 0, 0, vocab_size)]
    assert padded > vocab_size
    segs = [Segment("", vocab_size - 1, vocab_size - 1, 1, repeat=padded - vocab_size + 1)]
    if vocab_size > 1:
        segs.insert(0, Segment("", 0, 0, vocab_size - 1))
    return segs


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    extra = padded - t.shape[0]
    assert extra >= 0
    if extra == 0:
        return t
    return torch.cat([t, t[-1:].expand(extra, *t.shape[1:])], dim=0)


def unpad_vocab(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return t[:vocab_size]


def apply_segments(parts: dict, segments: Sequence[Segment], rows: int) -> torch.Tensor:
    """Build a fused tensor from canonical ``parts`` by ``segments`` (reference implementation)."""
    first = next(iter(parts.values()))
    out = torch.empty(rows, *first.shape[1:], dtype=first.dtype)
    written = 0
    for s in segments:
        src = parts[s.part][s.src_row:s.src_row + s.rows]
        if s.repeat > 1:
            src = src.expand(s.repeat, *src.shape[1:])
        out[s.dst_row:s.dst_row + s.rows * s.repeat] = src
        written += s.rows * s.repeat
    assert written == rows, f"segments cover {written} of {rows} rows"
    return out


# ---------------------------------------------------------------- RoPE (Meta <-> HF)

def rope_meta_to_hf(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Meta rotates adjacent pairs, HF rotates halves: per head, row ``2i+p`` -> ``p*hd/2+i``."""
    rest = w.shape[1:]
    hd = w.shape[0] // num_heads
    return w.reshape(num_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def rope_hf_to_meta(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    rest = w.shape[1:]
    hd = w.shape[0] // num_heads
    return w.reshape(num_heads, 2, hd // 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


# Row permutations a stored or target tensor may carry, applied per block of ``block`` rows
# (``SourceSlice.transform`` / ``TargetTensor.transform``: ``(name, block)``).
ROW_PERMUTATIONS = {
    "rope_meta_to_hf": lambda t, block: rope_meta_to_hf(t, t.shape[0] // block),
    "rope_hf_to_meta": lambda t, block: rope_hf_to_meta(t, t.shape[0] // block),
}
