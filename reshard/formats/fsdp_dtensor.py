"""Megatron-FSDP ``fsdp_dtensor`` checkpoints (FORMATS.md §10): a DCP checkpoint of the model's
global tensors, as Megatron-FSDP saves its ``Shard(0)`` DTensors.

Key rules (Megatron-LM ``tools/checkpoint/checkpoint_inspector.py::convert_checkpoint`` and
``megatron/core/transformer/fsdp_dtensor_checkpoint.py``):

- every model tensor under ``model.module.<Megatron-core key>``, **per layer** (``decoder.layers.{i}.…``,
  no stacked layer axis) with Transformer-Engine names, the vocab padded as in torch_dist;
- experts **per expert** under their global index, as Megatron-FSDP's grouped-GEMM modules name them:
  ``…mlp.experts.linear_fc1.weight{e}`` / ``…linear_fc2.weight{e}``;
- SwiGLU fc1 (dense, shared experts, experts) split in two TP-independent halves: ``…linear_fc1.weight_w``
  (the gate rows) and ``…weight_v`` (the up rows), ``weight{e}_w`` / ``weight{e}_v`` for experts;
- no ``_extra_state``; ``args``, ``checkpoint_version`` (3.0), ``iteration`` and our ``reshard`` record as
  DCP byte entries (torch.save'd objects); optimizer state would sit under
  ``optimizer.state.module.module.module.<key>.<exp_avg|exp_avg_sq|fp32_param>``, RNG state is not kept.

On disk the ``Shard(0)`` DTensors are only chunks of the global tensors: each piece of the plan is
written as one chunk by the rank that holds it (the torch_dist writer), and any chunking reads back.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import SourceError
from ..layout import Layout
from ..mapping import MappingTable
from ..models import table_for
from ..spec import ModelSpec
from ..types import Placement, TargetTensor
from . import megatron as mg
from . import torch_dist as td
from .base import RawReader, SourceIndex, SourceSlice
from .dcp_metadata import BytesStorageMetadata

NAME = "fsdp_dtensor"
ITERATIONS = True
PREFIX = "model.module."
CHECKPOINT_VERSION = 3.0
OBJECTS = ("args", "checkpoint_version", "iteration", "reshard")
# what the checkpoint may hold besides the model and is not converted (optimizer state, Megatron's
# rerun state machine); RNG state is never in fsdp_dtensor
OPTIONAL_PREFIXES = ("optimizer.", "rerun_state_machine", "rng_state")


def _has_model_keys(ckpt: str) -> bool:
    try:
        md, _ = td.read_metadata(ckpt)
    except SourceError:
        return False
    return any(k.startswith(PREFIX) for k in md.state_dict_metadata)


def detect(path: str) -> bool:
    """A DCP directory (or a checkpoint root whose tracker names one) holding ``model.module.*`` keys."""
    if td._is_dcp_dir(path):
        return _has_model_keys(path)
    if not os.path.isfile(os.path.join(path, mg.TRACKER)):
        return False
    return any((d == "release" or d.startswith("iter_")) and td._is_dcp_dir(os.path.join(path, d))
               and _has_model_keys(os.path.join(path, d)) for d in os.listdir(path))


# ------------------------------------------------------------------------- the key scheme

@dataclasses.dataclass(frozen=True)
class Key:
    """One fsdp_dtensor tensor: its key, entry, layer, and (SwiGLU fc1) which half: 0 = ``_w``, 1 = ``_v``."""

    key: str
    entry: object
    layer: Optional[int]
    half: Optional[int] = None


def _layer_name(e, half: Optional[int]) -> str:
    """The layer-relative name: experts by their global index (``linear_fc1.weight{e}``), ``_w``/``_v``."""
    name = e.dist_key
    if e.expert is not None:
        name = name.replace(".experts.experts.", ".experts.") + str(e.expert)
    return name if half is None else name + ("_w", "_v")[half]


def keys(spec: ModelSpec, table: MappingTable) -> List[Key]:
    """Every tensor key of the model, in table order."""
    out = [Key(PREFIX + e.mcore, e, None) for e in table.top if e.applies(spec)]
    for i in range(spec.num_layers):
        for e in table.layer:
            if not e.applies(spec, i):
                continue
            halves = (0, 1) if e.tp_rule == "gated" else (None,)
            for name in dict.fromkeys((e.dist_key,) + tuple(e.aliases)):
                for h in halves:
                    x = dataclasses.replace(e, dist=name) if name != e.dist_key else e
                    out.append(Key(PREFIX + table.layer_key(i, _layer_name(x, h)), e, i, h))
    return out


def _halve(pls: List[Placement], half: Optional[int], rows: int) -> List[Placement]:
    """The placements of one SwiGLU half, moved to its own rows (``[gate; up]``: gate rows first)."""
    if half is None:
        return pls
    f = rows // 2
    out = []
    for p in pls:
        r = p.dst_off[0]
        if half * f <= r < (half + 1) * f:
            out.append(dataclasses.replace(p, dst_off=(r - half * f,) + tuple(p.dst_off[1:])))
    return out


def placements(k: Key, spec: ModelSpec, layout: Layout, reading: bool = False,
               rows: Optional[int] = None) -> List[Placement]:
    """Canonical rectangles of the global tensor of key ``k``: with the layout's vocab padding, or
    (``reading``) the real rows of ``rows`` stored ones."""
    if reading:
        pls = mg.local_placements(k.entry, spec, td._GLOBAL, 0, k.layer, reading=True, rows=rows)
    else:
        pls = td._placements(k.entry, spec, layout, k.layer, stacked=False)
        if k.entry.expert is not None:  # one key per expert: no expert axis
            pls = [dataclasses.replace(p, dst_off=p.dst_off[1:]) for p in pls]
    return _halve(pls, k.half, k.entry.rows(spec, layout))


def shape(k: Key, spec: ModelSpec, layout: Layout) -> Tuple[int, ...]:
    s = k.entry.shape(spec, layout)
    return s if k.half is None else (s[0] // 2,) + s[1:]


# ------------------------------------------------------------------------- reading

def read_common(ckpt: str, md, storage) -> dict:
    present = [k for k in OBJECTS if k in md.state_dict_metadata]
    if "args" not in present and "reshard" not in present:
        raise SourceError(f"{ckpt}: neither 'args' nor a reshard record among the checkpoint's objects: "
                          "cannot tell the architecture")
    return {k: td.read_record(ckpt, storage, k) for k in present}


def read_index(root: str, iteration: Optional[int] = None, vocab_size: Optional[int] = None) -> SourceIndex:
    """``.metadata`` and the objects, every ``model.module.*`` key matched to the architecture (an unknown
    one is refused), the chunk records' headers, then the canonical rectangles inside each chunk."""
    ckpt, it = mg.checkpoint_dir(root, iteration, td._is_dcp_dir)
    md, storage = td.read_metadata(ckpt)
    common = read_common(ckpt, md, storage)
    spec = mg.spec_from_common(common, ckpt, vocab_size, td.tensor_shapes(md, PREFIX))
    table = table_for(spec)
    glob = td._GLOBAL
    want = {k.key: k for k in keys(spec, table)}
    problems, found = [], []
    for key, meta in sorted(md.state_dict_metadata.items()):
        if isinstance(meta, BytesStorageMetadata):
            if key not in OBJECTS and not key.startswith(OPTIONAL_PREFIXES):
                problems.append(f"unknown object {key}")
            continue
        if key.startswith(OPTIONAL_PREFIXES):
            continue  # optimizer state: not model weights, not converted
        k = want.get(key)
        if k is None:
            problems.append(f"unknown tensor {key} (refusing to drop it silently)")
            continue
        exp, got = shape(k, spec, glob), tuple(meta.size)
        if k.entry.tp_rule == "vocab" and got[0] >= spec.vocab_size:
            exp = (got[0],) + exp[1:]
        if got != exp:
            problems.append(f"{key} has global shape {got}, the architecture implies {exp}")
            continue
        found.append((k, meta))
    seen = {k.key for k, _ in found}
    covered = {(id(k.entry), k.layer, k.half) for k, _ in found}
    problems += [f"{k.key} is absent" for k in want.values()
                 if (id(k.entry), k.layer, k.half) not in covered and k.key not in seen]
    if problems:
        raise SourceError(f"{ckpt} does not match its architecture ({spec.model_type}, {spec.num_layers} layers):"
                          "\n  - " + "\n  - ".join(problems[:20]))
    found = _one_spelling(found)
    where = td._chunk_records(ckpt, [td._Key(k.key, [k.entry], [k.layer], False, m) for k, m in found], storage)
    slices: Dict[str, List[SourceSlice]] = defaultdict(list)
    dtypes: Dict[str, torch.dtype] = {}
    for k, meta in found:
        rows = meta.size[0] if k.entry.tp_rule == "vocab" else None
        pls = placements(k, spec, glob, reading=True, rows=rows)
        for ch in meta.chunks:
            st = td.chunk_tensor(ckpt, root, k.key, ch, where)
            for pl in pls:
                sl = td._slice_in_chunk(st, pl, 0, tuple(ch.offsets), tuple(ch.sizes))
                if sl is not None:
                    slices[pl.canonical].append(sl)
                    dtypes[pl.canonical] = st.dtype
    index = td.finish_index(NAME, root, ckpt, it, spec, table, common, md, where, slices, dtypes)
    index.source_layout = mg.layout_of_common(common, spec)
    return index


def _one_spelling(found: list) -> list:
    """A tensor written under several spellings (the MoE pre-MLP norm) is read from the first."""
    seen, out = set(), []
    for k, meta in found:
        ident = (id(k.entry), k.layer, k.half)
        if ident not in seen:
            seen.add(ident)
            out.append((k, meta))
    return out


class Reader(RawReader):
    """A DCP chunk is a torch.save record whose storage bytes sit at a known file offset."""


def stored(path: str) -> list:
    return td.stored(path)


# ------------------------------------------------------------------------- writing

def targets(spec: ModelSpec, layout: Layout, table: MappingTable, dtype_of) -> List[TargetTensor]:
    out = []
    for k in keys(spec, table):
        pls = placements(k, spec, layout)
        out.append(TargetTensor(k.key, shape(k, spec, layout), td._one_dtype(pls, dtype_of, k.key), pls,
                                rule=k.entry.tp_rule))
    return out


class Target(td.Target):
    """torch_dist's writer under Megatron-FSDP's keys: each piece one chunk, written by the rank that holds
    it; rank 0 writes the objects, no ``_extra_state`` and no ``metadata.json``; the tracker at the commit."""

    name = NAME
    ckpt_format = NAME

    def tensors(self):
        c = self.ctx
        return targets(c.spec, c.layout, c.table, c.dtype_of)

    def writers(self, tensors, world):
        return None  # global tensors: any rank may write any chunk

    def common(self, dtype):
        common = super().common(dtype)
        common["checkpoint_version"] = CHECKPOINT_VERSION
        return common

    def objects(self, job, rank: int, world: int) -> Dict[str, object]:
        return {k: job.common[k] for k in OBJECTS if k in job.common} if rank == 0 else {}

    def side_files(self, job, out_dir: str) -> None:
        pass
