"""Megatron-core ``torch_dist`` checkpoints, written with torch.distributed.checkpoint
(FORMATS.md §5).

Keys are global and TP/PP-independent: layer tensors (``decoder.layers.``, BERT's
``encoder.layers.``) are stacked on a leading layer axis under Transformer-Engine names - or, in a
model that mixes dense and MoE layers, keyed per layer (``decoder.layers.{i}.<name>``, no layer
axis) as Megatron-core writes non-homogeneous layers; fc1 is the logical ``[W; V]``;
embedding/output are padded for the target TP. Each piece of the plan becomes one DCP chunk (a
rectangle of the global tensor) written by the rank that holds it - no DTensor, no full tensor
anywhere. Also written: ``_extra_state`` objects (``[None]``), the common state as the DCP byte entry
``common_state/shard_0_1``, ``metadata.json``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import dist as rdist
from .. import optim
from . import dist_opt
from ..errors import SourceError
from ..layout import Layout
from ..mapping import MappingTable
from ..models import table_for
from ..types import Piece, Placement, TargetTensor
from ..spec import ModelSpec
from . import megatron as mg
from .base import RawReader, SourceIndex, SourceSlice, StoredTensor
from .dcp_metadata import BytesStorageMetadata
from .target import Target as _Target
from .torchzip import TensorRef, parse_file, parse_record, read_scalar, restricted_loads

NAME = "torch_dist"
ITERATIONS = True
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
COMMON_KEY = "common_state/shard_0_1"
_GLOBAL = Layout(tp=1)  # torch_dist keys hold global tensors: the layout of one rank holding all


def _is_dcp_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def detect(path: str) -> bool:
    """A DCP directory, or a checkpoint root whose tracker names one."""
    if _is_dcp_dir(path):
        return True
    if not os.path.isfile(os.path.join(path, mg.TRACKER)):
        return False
    return any((d == "release" or d.startswith("iter_")) and _is_dcp_dir(os.path.join(path, d))
               for d in os.listdir(path))


# ------------------------------------------------------------------------- reading

OPTIONAL_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state")


NOT_CARRIED = {"optimizer.": "optimizer state", "rng_state": "RNG state",
               "rerun_state_machine": "rerun state machine"}


def not_carried(md) -> Dict[str, dict]:
    """The DCP keys of training state (optimizer, RNG) that no target carries: counted, with their bytes."""
    from .dcp_metadata import TensorStorageMetadata

    out: Dict[str, dict] = {}
    for key, meta in md.state_dict_metadata.items():
        kind = next((v for k, v in NOT_CARRIED.items() if key.startswith(k)), None)
        if kind is None:
            continue
        d = out.setdefault(kind, {"entries": 0, "bytes": 0, "where": f"{key.split('.')[0].split('/')[0]}* keys"})
        d["entries"] += 1
        if isinstance(meta, TensorStorageMetadata):
            d["bytes"] += _nbytes(meta)
    return out


def tensor_shapes(md, prefix: str = "") -> Dict[str, tuple]:
    """Tensor key (``prefix`` removed) -> global shape, from DCP metadata."""
    from .dcp_metadata import TensorStorageMetadata

    return {k[len(prefix):]: tuple(m.size) for k, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and k.startswith(prefix)}


def _nbytes(meta) -> int:
    return meta.properties.dtype.itemsize * math.prod(meta.size)


def _record_tree(fd: int, info, where: str):
    return parse_record(fd, info.offset, info.length, where)


def _parse_file_chunks(ckpt: str, file: str, wanted: List[tuple]):
    """TensorRefs of the records ``wanted`` = [(key, offsets, offset, length)] of one .distcp file."""
    path = os.path.join(ckpt, file)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SourceError(f"{path} is named by .metadata but does not exist (incomplete copy?)") from None
    try:
        size = os.fstat(fd).st_size
        out = []
        for key, offsets, off, length in wanted:
            if off + length > size:
                raise SourceError(f"{path} is truncated: {key} at {list(offsets)} needs bytes up to "
                                  f"{off + length}, the file has {size}")
            out.append(parse_record(fd, off, length, f"{path} ({key} at {list(offsets)})"))
        return out
    finally:
        os.close(fd)


def read_record(ckpt: str, storage, key: str):
    """A DCP byte entry as it was saved, parsed without running code."""
    info = storage[(key, ())]
    path = os.path.join(ckpt, info.relative_path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SourceError(f"{path} is named by .metadata but does not exist (incomplete copy?)") from None
    try:
        return parse_record(fd, info.offset, info.length, f"{path} ({key})")
    finally:
        os.close(fd)


def read_object(ckpt: str, storage, key: str):
    """A Megatron ShardedObject (``<key>/shard_0_1``, saved as ``[object]``)."""
    obj = read_record(ckpt, storage, key)
    return obj[0] if isinstance(obj, list) and obj else obj


def common_file(ckpt: str, md, storage) -> str:
    """The file whose records hold the common state (its tensors, e.g. a ``common_step``, are read from it)."""
    if COMMON_KEY in md.state_dict_metadata:
        return os.path.join(ckpt, storage[(COMMON_KEY, ())].relative_path)
    return os.path.join(ckpt, "common.pt")


def read_common(ckpt: str, md, storage) -> dict:
    """The common state: the DCP byte entry ``common_state/shard_0_1`` or ``common.pt``."""
    if COMMON_KEY in md.state_dict_metadata:
        return read_object(ckpt, storage, COMMON_KEY)
    if os.path.isfile(os.path.join(ckpt, "common.pt")):
        return parse_file(os.path.join(ckpt, "common.pt"))
    raise SourceError(f"{ckpt}: no common state ({COMMON_KEY} in .metadata, or common.pt): "
                      "cannot tell the architecture")


def read_metadata(ckpt: str):
    path = os.path.join(ckpt, ".metadata")
    try:
        with open(path, "rb") as f:
            md = restricted_loads(f.read())
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise SourceError(f"{path} cannot be read ({type(e).__name__}: {e}); truncated or not DCP?") from None
    if not hasattr(md, "state_dict_metadata"):
        raise SourceError(f"{path} is not DCP metadata")
    storage = {(k.fqn, tuple(k.offset) if k.offset is not None else ()): v for k, v in md.storage_data.items()}
    return md, storage


def _entry_lookup(spec: ModelSpec, table: MappingTable):
    """Top-level key -> entry; layer-relative key -> the ``[entry]`` groups (one entry per expert
    for experts) it may name - a dense layer's and an MoE layer's (:func:`_group_at` picks).
    Every spelling is accepted: TE names, local-spec names, the aliases written alongside."""
    top = {e.mcore: e for e in table.top if e.applies(spec)}
    layer: Dict[str, list] = {}
    for key, entries in layer_groups(spec, table):
        e = entries[0]
        for name in dict.fromkeys((key, e.mcore if e.expert is None else None, e.local) + tuple(e.aliases)):
            if name:
                layer.setdefault(name, []).append(entries)
    return top, layer


def _group_at(groups: list, spec: ModelSpec, layer: Optional[int]) -> Optional[list]:
    """The group that exists at ``layer`` (None: a stacked key, whose group must exist at every layer)."""
    for g in groups:
        e = g[0]
        if layer is None and all(e.applies(spec, i) for i in range(spec.num_layers)):
            return g
        if layer is not None and e.applies(spec, layer):
            return g
    return None


def per_layer_re(table: MappingTable) -> re.Pattern:
    """``<block>.layers.<i>.<name>``: a per-layer key (groups: the layer, the layer-relative name)."""
    return re.compile("^" + re.escape(table.stack_prefix) + r"(\d+)\.(.+)$")


def read_index(root: str, iteration: Optional[int] = None, vocab_size: Optional[int] = None) -> SourceIndex:
    """``.metadata`` and the common state, each key matched to its mapping entries, the chunk
    records' headers, then the slices of every canonical tensor inside the chunks."""
    ckpt, it = mg.checkpoint_dir(root, iteration, _is_dcp_dir)
    _check_backend(ckpt)
    md, storage = read_metadata(ckpt)
    common = read_common(ckpt, md, storage)
    spec = mg.spec_from_common(common, ckpt, vocab_size, tensor_shapes(md))
    table = table_for(spec)
    opt = {"keys": [], "problems": []}
    keys, problems = _match_keys(md, spec, table, opt)
    keys, seen = _one_spelling(keys)
    problems += _absent(spec, table, seen)
    if problems:
        raise SourceError(f"{ckpt} does not match its architecture ({spec.model_type}, {spec.num_layers} layers):"
                          "\n  - " + "\n  - ".join(problems[:20]))
    opt_keys = _optimizer_keys(opt, spec, table)
    where = _chunk_records(ckpt, keys + opt_keys, storage)
    slices: Dict[str, List[SourceSlice]] = defaultdict(list)
    dtypes: Dict[str, torch.dtype] = {}
    for k in keys + opt_keys:
        for ch in k.meta.chunks:
            st = chunk_tensor(ckpt, root, k.key, ch, where)
            for name, sl in _chunk_slices(spec, k, st, tuple(ch.offsets), tuple(ch.sizes)):
                name = optim.shadow(k.kind, name) if k.kind else name
                slices[name].append(sl)
                dtypes[name] = st.dtype
    index = finish_index(NAME, root, ckpt, it, spec, table, common, md, where, slices, dtypes)
    index.source_layout = mg.layout_of_common(common, spec) if "args" in common or "reshard" in common else None
    index.vocab_rows = _vocab_rows(md)
    if opt_keys or opt["problems"]:
        index.optimizer = _optimizer_info(opt, opt_keys, common, index, common_file(ckpt, md, storage))
        if "param" in index.optimizer["kinds"] and "reshard" not in common:  # Megatron's own distributed save
            risk = dist_opt.fully_reshardable_risk(spec, table, index.source_layout, common.get("args"))
            index.optimizer["warnings"] = [risk] if risk else []
    elif any(dist_opt.parse_dp_key(k) for k in md.state_dict_metadata):
        index.optimizer = _dp_reshardable(ckpt, root, md, storage, spec, table, common, index)
    return index


def _dp_reshardable(ckpt: str, root: str, md, storage, spec: ModelSpec, table: MappingTable, common: dict,
                    index: SourceIndex) -> dict:
    """The bucket-space state of ``dp_reshardable`` (``optimizer.distributed.dp_group_idx_*``), decoded into
    shadow slices (reshard/formats/dist_opt.py); what cannot be decoded is a problem (an error only when
    the state is to be kept)."""
    buckets: Dict[tuple, Dict[str, tuple]] = defaultdict(dict)  # (mp rank, gbuf, bucket) -> kind -> (key, meta)
    dtypes = set()  # "(torch.float32, torch.float32)": the buffers' (param dtype, grad dtype)
    for key, meta in md.state_dict_metadata.items():
        k = dist_opt.parse_dp_key(key)
        if k is not None:
            buckets[(k[0], k[1], k[3])][k[4]] = (key, meta)
            dtypes.add(k[2])
    kinds = sorted({kind for b in buckets.values() for kind in b})
    grad = next(iter(dtypes)).strip("()").split(",")[-1].strip() if len(dtypes) == 1 else ""
    info = {"kinds": kinds, "sharding": "dp_reshardable", "grad_dtype": getattr(torch, grad[len("torch."):], None),
            "state": None, "problems": [], "tensors": 0, "scheduler": common.get("opt_param_scheduler"),
            "args": common.get("args")}
    try:
        slices = dist_opt.decode_buckets(
            spec, table, index.source_layout, buckets, _impl_of(common), index.vocab_rows,
            lambda pairs: _chunk_records(ckpt, [_Key(k, [], [], False, m) for k, m in pairs], storage),
            lambda key, ch, records: chunk_tensor(ckpt, root, key, ch, records), ckpt)
    except SourceError as e:
        info["problems"].append(str(e))
        return info
    groups = read_object(ckpt, storage, "optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1") \
        if ("optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1", ()) in storage else None
    info["state"] = {"optimizer": groups} if groups is not None else None
    dist_opt.attach(index, info, slices, kinds)
    return info


def _impl_of(common: dict) -> str:
    """The run's ``--transformer-impl`` (Megatron-LM's default: transformer_engine): the parameter order
    differs (Transformer Engine fuses the norms into the next GEMM); torch_dist keys cannot tell, the local
    spec saves Transformer Engine's names."""
    return str(mg._get(common.get("args"), "transformer_impl", default="transformer_engine"))


def _vocab_rows(md) -> Optional[int]:
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        m = md.state_dict_metadata.get(key)
        if m is not None:
            return int(m.size[0])
    return None


def _optimizer_keys(opt: dict, spec: ModelSpec, table: MappingTable) -> List[_Key]:
    """The model-space optimizer keys, one spelling each; every kind found must shadow every weight
    (else the state is incomplete: a problem, refused if it is to be kept)."""
    by_kind: Dict[str, List[_Key]] = defaultdict(list)
    for k in opt["keys"]:
        by_kind[k.kind].append(k)
    out = []
    for kind, ks in sorted(by_kind.items()):
        kept, seen = _one_spelling(ks)
        for p in _absent(spec, table, seen):
            opt["problems"].append(f"optimizer.state.{kind}.{p}")
        out += kept
    return out


def _optimizer_info(opt: dict, opt_keys: List[_Key], common: dict, index: SourceIndex, common_path: str) -> dict:
    meta = common.get("content_metadata") if isinstance(common, dict) else None
    sharding = (meta or {}).get("distrib_optim_sharding_type") or "fully_reshardable"
    state = common.get("optimizer") if isinstance(common, dict) else None
    kinds = sorted({k.kind for k in opt_keys})
    names = optim.shadows(index.slices)
    for name in names:
        index.shapes[name] = index.shapes[optim.split(name)[1]]
    step = None
    if "param" not in kinds and isinstance(state, dict):  # the non-distributed optimizer (FP32 / Float16Optimizer)
        sharding = optim.NON_DISTRIBUTED
        inner = state.get("optimizer", state) if "fp32_param" in kinds else state  # Float16Optimizer nests it
        ref = (inner.get("state") or {}).get("common_step")
        if isinstance(ref, TensorRef):  # a scalar in the common state's record
            step = read_scalar(common_path, ref)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.get("param_groups", [])]
        state = {"param_groups": groups, **({"grad_scaler": state["grad_scaler"]} if "grad_scaler" in state else {})}
    return {"kinds": kinds, "sharding": sharding, "state": state, "problems": opt["problems"], "tensors": len(names),
            "step": step,
            "scheduler": common.get("opt_param_scheduler") if isinstance(common, dict) else None,
            "args": common.get("args") if isinstance(common, dict) else None}


def chunk_tensor(ckpt: str, root: str, key: str, ch, where) -> StoredTensor:
    """The stored tensor of one DCP chunk of ``key``, checked against what ``.metadata`` promises."""
    f, ref = where[(key, tuple(ch.offsets))]
    if not isinstance(ref, TensorRef) or tuple(ref.shape) != tuple(ch.sizes) or not ref.contiguous:
        raise SourceError(f"{ckpt}/{f}: the record of {key} at {list(ch.offsets)} is not the "
                          f"contiguous {tuple(ch.sizes)} tensor .metadata promises")
    rel = os.path.relpath(ckpt, root)
    return StoredTensor(os.path.normpath(os.path.join(rel, f)), f"{key}@{list(ch.offsets)}", tuple(ch.sizes),
                        ref.dtype, ref.offset)


def finish_index(name: str, root: str, ckpt: str, it, spec: ModelSpec, table: MappingTable, common: dict, md,
                 where, slices, dtypes) -> SourceIndex:
    """The SourceIndex of a DCP checkpoint (torch_dist, fsdp_dtensor) once its chunks are sliced."""
    rel = os.path.relpath(ckpt, root)
    shapes = {n: e.part_shape(spec, role) for n, (e, role, _) in table.canonical_names(spec).items()}
    files = sorted({f for f, _ in where.values()})
    sizes = {os.path.normpath(os.path.join(rel, f)): os.path.getsize(os.path.join(ckpt, f)) for f in files}
    index = SourceIndex(name, root, spec, shapes, dtypes, dict(slices), sizes, it)
    index.guessed = mg.guessed_fields(common, spec)
    index.not_carried = not_carried(md)
    return index


def _check_backend(ckpt: str) -> None:
    mj = os.path.join(ckpt, "metadata.json")
    if os.path.isfile(mj):
        with open(mj) as f:
            backend = json.load(f).get("sharded_backend")
        if backend not in ("torch_dist", None):
            raise SourceError(f"{mj}: sharded_backend={backend!r}; only torch_dist is read")


@dataclass
class _Key:
    """A tensor key of ``.metadata`` and what it holds: its mapping entries (one per expert for
    ``[L, E, ...]`` keys), its layers, whether the layer axis is stacked, its storage metadata."""

    key: str
    entries: list
    layers: list
    stacked: bool
    meta: object
    kind: Optional[str] = None  # optimizer state (reshard/optim.py): the kind; None: a model tensor


def _match_keys(md, spec: ModelSpec, table: MappingTable, optimizer: Optional[dict] = None
                ) -> Tuple[List[_Key], List[str]]:
    """Every key of ``.metadata`` matched to the architecture (byte objects, optimizer and RNG
    state are known and skipped), with its global shape checked. The model-space optimizer keys
    (``optimizer.state.<kind>.<model key>``) are matched like their model key and appended to
    ``optimizer["keys"]``, their problems to ``optimizer["problems"]`` (they matter only when the
    state is kept)."""
    problems, keys = [], []
    match = _key_matcher(spec, table)
    for key, meta in sorted(md.state_dict_metadata.items()):
        if isinstance(meta, BytesStorageMetadata):
            if not (key == COMMON_KEY or "_extra_state" in key or key.startswith(OPTIONAL_PREFIXES)):
                problems.append(f"unknown object {key}")
            continue
        opt = optim.dcp_model_key(key)
        if opt is not None and optimizer is not None:
            k = match(opt[1], meta, optimizer["problems"])
            if k is not None:
                k.key, k.kind = key, opt[0]
                optimizer["keys"].append(k)
            continue
        if key.startswith(OPTIONAL_PREFIXES):
            continue  # the rest of the optimizer state, RNG: not model weights, not converted
        k = match(key, meta, problems)
        if k is not None:
            keys.append(k)
    return keys, problems


def _key_matcher(spec: ModelSpec, table: MappingTable):
    top, layer = _entry_lookup(spec, table)
    L, glob, P, per_layer = spec.num_layers, _GLOBAL, table.stack_prefix, per_layer_re(table)

    def match(key: str, meta, problems: list) -> Optional[_Key]:
        m = per_layer.match(key)
        stacked = key.startswith(P) and key[len(P):] in layer
        group = (_group_at(layer[key[len(P):]], spec, None) if stacked else
                 _group_at(layer[m.group(2)], spec, int(m.group(1))) if m and m.group(2) in layer else None)
        if key in top:
            k = _Key(key, [top[key]], [None], False, meta)
        elif stacked and group:
            k = _Key(key, group, list(range(L)), True, meta)
        elif stacked and spec.mixed_layers:
            problems.append(f"{key} is stacked over all layers, but layers {list(spec.dense_layers)} are dense "
                            "and the others MoE")
            return None
        elif group and int(m.group(1)) < L:
            k = _Key(key, group, [int(m.group(1))], False, meta)
        else:
            problems.append(f"unknown tensor {key} (refusing to drop it silently)")
            return None
        e, shape = k.entries[0], tuple(meta.size)
        exp = e.shape(spec, glob)
        if e.tp_rule == "vocab":
            exp = (shape[0],) + exp[1:] if shape[0] >= spec.vocab_size else exp
        if e.expert is not None:
            exp = (spec.num_experts,) + exp
        if k.stacked:
            exp = (L,) + exp
        if shape != exp:
            problems.append(f"{key} has global shape {shape}, the architecture implies {exp}")
            return None
        return k

    return match


def _one_spelling(keys: List[_Key]) -> Tuple[List[_Key], set]:
    """A tensor written under several spellings (the MoE pre-MLP norm) is read from one of them;
    also returns every ``(entry, layer)`` found."""
    seen, kept = set(), []
    for k in keys:
        if all((id(e), i) in seen for e in k.entries for i in k.layers):
            continue
        seen |= {(id(e), i) for e in k.entries for i in k.layers}
        kept.append(k)
    return kept, seen


def _absent(spec: ModelSpec, table: MappingTable, seen: set) -> List[str]:
    missing = [(e, i) for e, i in table.entries(spec) if (id(e), i) not in seen]
    P = table.stack_prefix
    out = [f"{P + e.dist_key if i is not None else e.mcore}{'' if i is None else f' (layer {i})'} is absent"
           for e, i in missing if e.expert is None]
    if any(e.expert is not None for e, _ in missing):
        keys = sorted({P + e.dist_key for e, _ in missing if e.expert is not None})
        experts = sorted({(i, e.expert) for e, i in missing if e.expert is not None})
        out.append(f"{', '.join(keys)} absent: missing experts "
                   + ", ".join(f"layer {i} expert {x}" for i, x in experts[:20]))
    return out


def _chunk_records(ckpt: str, keys: List[_Key], storage) -> Dict[tuple, tuple]:
    """``(key, chunk offsets) -> (file, TensorRef)``: every chunk's record header, parsed by the
    ranks in turn, file by file."""
    wanted: Dict[str, List[tuple]] = {}
    for k in keys:
        for ch in k.meta.chunks:
            info = storage.get((k.key, tuple(ch.offsets)))
            if info is None:
                raise SourceError(f"{ckpt}/.metadata: chunk {list(ch.offsets)} of {k.key} has no storage entry")
            wanted.setdefault(info.relative_path, []).append((k.key, tuple(ch.offsets), info.offset, info.length))
    files = sorted(wanted)
    refs = dict(zip(files, rdist.map_shared(lambda f: _parse_file_chunks(ckpt, f, wanted[f]), files)))
    return {(key, offsets): (f, ref) for f in files for (key, offsets, _, _), ref in zip(wanted[f], refs[f])}


def _chunk_slices(spec: ModelSpec, k: _Key, st: StoredTensor, c_lo, c_sz):
    """``(canonical name, SourceSlice)`` of every canonical rectangle inside one chunk of ``k``."""
    glob = _GLOBAL
    axes = (1 if k.stacked else 0) + (1 if k.entries[0].expert is not None else 0)  # leading layer/expert axes
    rows = k.meta.size[axes]
    ls = k.layers if not k.stacked else range(c_lo[0], c_lo[0] + c_sz[0])
    xs = [None] if k.entries[0].expert is None else range(c_lo[axes - 1], c_lo[axes - 1] + c_sz[axes - 1])
    for i in ls:
        for x in xs:
            e = k.entries[0] if x is None else k.entries[x]
            lead = ((i,) if k.stacked else ()) + (() if x is None else (x,))
            for pl in mg.local_placements(e, spec, glob, 0, i, lead=lead, reading=True, rows=rows):
                sl = _slice_in_chunk(st, pl, len(lead), c_lo, c_sz)
                if sl is not None:
                    yield pl.canonical, sl


def _slice_in_chunk(st: StoredTensor, pl: Placement, n: int, c_lo, c_sz) -> Optional[SourceSlice]:
    """The part of placement ``pl`` (``n`` leading layer/expert axes) inside the DCP chunk
    ``[c_lo, c_lo+c_sz)`` stored as ``st``, or None when they do not meet."""
    d_sz = (1,) * n + tuple(pl.c_size)
    lo = tuple(max(a, b) for a, b in zip(pl.dst_off, c_lo))
    hi = tuple(min(a + x, b + y) for a, x, b, y in zip(pl.dst_off, d_sz, c_lo, c_sz))
    if any(h <= q for q, h in zip(lo, hi)):
        return None
    c_off = tuple(c + (q - d) for c, q, d in zip(pl.c_off, lo[n:], pl.dst_off[n:]))
    return SourceSlice(st, c_off, tuple(q - c for q, c in zip(lo, c_lo)), tuple(h - q for q, h in zip(lo[n:], hi[n:])))


class Reader(RawReader):
    """A DCP chunk is a torch.save record whose storage bytes sit at a known file offset."""


def stored(path: str) -> list:
    """Every tensor key of ``.metadata`` with its global shape and chunk count (``reshard inspect``)."""
    from .dcp_metadata import TensorStorageMetadata

    ckpt, _ = mg.checkpoint_dir(path, None, _is_dcp_dir)
    md, _ = read_metadata(ckpt)
    out = []
    for k, m in sorted(md.state_dict_metadata.items()):
        if isinstance(m, TensorStorageMetadata):
            out.append({"name": k, "file": f"{len(m.chunks)} chunk(s)", "shape": list(m.size),
                        "dtype": str(m.properties.dtype)[6:], "bytes": _nbytes(m)})
    return out


# ------------------------------------------------------------------------- target tensors

def _placements(entry, spec, layout, layer: Optional[int], stacked: bool = True) -> List[Placement]:
    out = []
    lead = (() if layer is None or not stacked else (layer,)) + (() if entry.expert is None else (entry.expert,))
    for seg in entry.segments(spec, layout):
        name = entry.parts()[seg.part]
        name = name.format(i=layer) if layer is not None else name
        rest = entry.part_shape(spec, seg.part)[1:]
        zeros = (0,) * len(rest)
        out.append(Placement(name, (seg.src_row,) + zeros, (seg.rows,) + rest,
                             lead + (seg.dst_row,) + zeros, seg.repeat))
    return out


def layer_groups(spec: ModelSpec, table: MappingTable) -> List[tuple]:
    """``(dist key, [entries])`` of the stacked layer tensors: one entry, or one per expert
    (``[L, E, ...]``), in table order."""
    groups: Dict[tuple, list] = {}
    for e in table.layer:
        if e.applies(spec):
            groups.setdefault((e.dist_key, e.layers), []).append(e)
    return [(key, entries) for (key, _), entries in groups.items()]


def targets(spec: ModelSpec, layout: Layout, table: MappingTable,
            dtype_of: Callable[[str], torch.dtype]) -> List[TargetTensor]:
    """The global tensors of a homogeneous GPT model, stacked on the layer axis (and the expert
    axis for expert tensors). Each expert is its own placements: no expert stack is built."""
    out = []
    for e in table.top:
        if e.applies(spec):
            pls = _placements(e, spec, layout, None)
            out.append(TargetTensor(e.mcore, e.shape(spec, layout), _one_dtype(pls, dtype_of, e.mcore), pls,
                                    rule=e.tp_rule))
    for dist_key, entries in layer_groups(spec, table):
        e = entries[0]
        experts = (spec.num_experts,) if e.expert is not None else ()
        if spec.mixed_layers:  # per-layer keys, no layer axis (Megatron-core's non-homogeneous layers)
            for i in range(spec.num_layers):
                if not e.applies(spec, i):
                    continue
                pls = [p for x in entries for p in _placements(x, spec, layout, i, stacked=False)]
                for key in dict.fromkeys((dist_key,) + tuple(e.aliases)):
                    key = table.layer_key(i, key)
                    out.append(TargetTensor(key, experts + e.shape(spec, layout), _one_dtype(pls, dtype_of, key),
                                            pls, rule=e.tp_rule))
            continue
        pls = [p for i in range(spec.num_layers) for x in entries for p in _placements(x, spec, layout, i)]
        for key in (dist_key,) + tuple(e.aliases):
            key = table.stack_prefix + key
            out.append(TargetTensor(key, (spec.num_layers,) + experts + e.shape(spec, layout),
                                    _one_dtype(pls, dtype_of, key), pls, rule=e.tp_rule))
    return out


def optimizer_targets(model: List[TargetTensor], kinds, dtype_of) -> List[TargetTensor]:
    """The model-space optimizer tensors (``optimizer.state.<kind>.<model key>``): each model tensor's
    global shape and placements, over the shadows of its canonical tensors."""
    out = []
    for kind in kinds:
        for t in model:
            pls = [dataclasses.replace(p, canonical=optim.shadow(kind, p.canonical)) for p in t.placements]
            key = f"{optim.DCP_PREFIX}{kind}.{t.key}"
            out.append(TargetTensor(key, t.shape, _one_dtype(pls, dtype_of, key), pls, rule=t.rule))
    return out


def _one_dtype(pls, dtype_of, key) -> torch.dtype:
    dts = {dtype_of(p.canonical) for p in pls}
    if len(dts) != 1:
        raise AssertionError(f"{key} would mix dtypes {sorted(map(str, dts))}")
    return dts.pop()


def extra_state_keys(spec: ModelSpec, table: MappingTable) -> List[str]:
    """``<module>._extra_state/shard_{layer}_{L}`` for every linear Megatron checkpoints (and
    ``/shard_0_1`` for a top-level one the table names: BERT's output layer)."""
    L, E, P = spec.num_layers, spec.num_experts, table.stack_prefix
    out = [f"{e.extra_state}._extra_state/shard_0_1" for e in table.top if e.extra_state and e.applies(spec)]
    for e in table.layer:
        if not (e.extra_state and e.applies(spec)):
            continue
        if spec.mixed_layers:  # per layer: /shard_0_1, experts /shard_{e}_{E}
            module = e.extra_state if e.expert is None else e.dist_key.rsplit(".", 1)[0]
            shard = "0_1" if e.expert is None else f"{e.expert}_{E}"
            out += [table.layer_key(i, f"{module}._extra_state/shard_{shard}") for i in range(L) if e.applies(spec, i)]
        elif e.expert is None:
            out += [f"{P}{e.extra_state}._extra_state/shard_{i}_{L}" for i in range(L)]
        else:  # experts: one object per (layer, expert)
            module = e.dist_key.rsplit(".", 1)[0]
            out += [f"{P}{module}._extra_state/shard_{i}.{e.expert}_{L}.{E}" for i in range(L)]
    return out


def layout_writers(spec: ModelSpec, layout: Layout, world: int, table: Optional[MappingTable] = None):
    """Writers that mirror the target layout: the piece goes to the rank that would hold it
    in a Megatron job at that layout (virtual rank ``pp_stage*S + tp_rank``, experts
    ``pp_stage*S + ep_rank*etp + etp_rank``, with ``S = max(tp, ep*etp)``; modulo N)."""
    etp, E = layout.expert_tp, spec.num_experts
    table = table or table_for(spec)
    P, per_layer_key = table.stack_prefix, per_layer_re(table)
    S = max(layout.tp, layout.ep * etp)
    stage = {}
    for p, chunks in enumerate(layout.stage_layers(spec.num_layers)):
        for layers in chunks:
            for i in layers:
                stage[i] = p

    def writers(piece: Piece, t: TargetTensor) -> Tuple[int, ...]:
        lead = len(piece.dst_off) - len(piece.size)
        row = piece.dst_off[lead]
        opt = optim.dcp_model_key(t.key)
        key = opt[1] if opt else t.key  # optimizer state: written where its weight is
        per_layer = per_layer_key.match(key)
        if per_layer:  # decoder.layers.{i}.<name>: [E, ...] or the layer's own tensor
            pp, layer_axes = stage[int(per_layer.group(1))], 0
        elif key.startswith(P):  # [L, ...] or [L, E, ...]
            pp, layer_axes = stage[piece.dst_off[0]], 1
        else:
            pp, layer_axes = (0 if key.startswith("embedding.") else layout.pp - 1), 0
        rows = t.shape[lead]
        expert = lead - layer_axes == 1
        n = etp if expert else layout.tp
        if t.rule in ("column", "qkv", "vocab"):
            tp = row * n // rows
        elif t.rule == "gated":
            tp = (row % (rows // 2)) * n // (rows // 2)
        else:
            tp = 0
        if expert:
            tp += layout.expert_rank(piece.dst_off[layer_axes], E)[0] * etp
        return ((pp * S + tp) % world,)

    return writers


# ------------------------------------------------------------------------- writing

class Target(_Target):
    """A DCP checkpoint: each piece one chunk, written by the rank that holds it
    (:mod:`reshard.formats.dcp_writer`), the ``_extra_state`` objects shared out over the ranks,
    the common state by rank 0; ``metadata.json`` beside it."""

    name = NAME

    def __init__(self, ctx):
        super().__init__(ctx)
        self.subdir = mg.iteration_dirname(ctx.cfg.target.iteration)

    def tensors(self):
        c = self.ctx
        out = targets(c.spec, c.layout, c.table, c.dtype_of)
        if c.optimizer:
            out += optimizer_targets(out, c.optimizer["kinds"], c.dtype_of)
        return out

    def common(self, dtype: torch.dtype) -> dict:
        common = super().common(dtype)
        opt = self.ctx.optimizer
        if not opt:
            return common
        mg.carry_training_state(common, opt, self.ctx.cfg.parallel.target_dp)
        common["content_metadata"] = {"distrib_optim_sharding_type": "fully_reshardable"}
        if opt["sharding"] == optim.NON_DISTRIBUTED:  # as FP32 / Float16Optimizer.sharded_state_dict saves it
            inner = {"param_groups": (opt["state"] or {}).get("param_groups", []),
                     "state": {"common_step": torch.tensor(float(opt["step"] or 0))}}
            if "fp32_param" in opt["kinds"]:  # Float16Optimizer: Adam's state under 'optimizer', its masters sharded
                inner = {"optimizer": inner, **{k: v for k, v in opt["state"].items() if k == "grad_scaler"}}
            common["optimizer"] = inner
            common["args"].use_distributed_optimizer = False
        else:  # the distributed optimizer's param groups (with their step) and its sharding type
            common["optimizer"] = dict(opt["state"] or {}, param_state_sharding_type="fully_reshardable")
        return common

    def writers(self, tensors, world):
        return layout_writers(self.ctx.spec, self.ctx.layout, world, self.ctx.table) if self.io.assign == "layout" else None

    def objects(self, job, rank: int, world: int) -> Dict[str, object]:
        """This rank's DCP byte entries: its share of the ``_extra_state`` objects; rank 0 the common state."""
        objects: Dict[str, object] = {}
        for j, key in enumerate(extra_state_keys(job.spec, self.ctx.table)):
            if j % world == rank:
                objects[key] = [None]
        if rank == 0:
            objects[COMMON_KEY] = [job.common]
        return objects

    def write(self, job, out_dir, rank, world, pieces, source, wrote) -> None:
        from .dcp_writer import save

        objects = self.objects(job, rank, world)
        save(out_dir, rank, world, pieces, job.plan.targets, source.payload,
             objects, self.io.fsync, wrote, self.chunk, self.io.crc32)

    def side_files(self, job, out_dir: str) -> None:
        with open(os.path.join(out_dir, "metadata.json"), "w") as f:
            json.dump(METADATA_JSON, f)

    def finish(self, job, stage: str) -> None:
        mg.write_tracker(stage, job.iteration)


def load_full(ckpt_dir: str):
    """``(tensors, objects)`` of a DCP checkpoint as full tensors, with plain
    torch.distributed.checkpoint in this process (for checks and small checkpoints)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    reader = dcp.FileSystemReader(ckpt_dir)
    md = reader.read_metadata()
    state = {}
    for k, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            state[k] = torch.empty(m.size, dtype=m.properties.dtype)
        elif isinstance(m, BytesStorageMetadata):
            state[k] = io.BytesIO()
    dcp.load(state, storage_reader=reader, no_dist=True)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    objects = {}
    for k, v in state.items():
        if k in tensors:
            continue
        if isinstance(v, io.BytesIO):  # the default planner usually torch.loads byte entries itself
            v.seek(0)
            v = torch.load(v, weights_only=False)
        objects[k] = v
    return tensors, objects
