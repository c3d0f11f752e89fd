"""Megatron legacy checkpoints (``--ckpt-format torch``; FORMATS.md §4).

``<root>/latest_checkpointed_iteration.txt`` names ``release/`` or ``iter_XXXXXXX/``, which
holds one ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` per model-parallel rank: a torch.save
dict with ``args``, ``checkpoint_version``, ``iteration`` and ``model`` (or ``model0``,
``model1``, ... per virtual pipeline stage) holding local tensors under local layer indices.

Reading never runs the files' pickles: :mod:`reshard.formats.torchzip` lists every tensor's
byte range from ``data.pkl`` with a restricted unpickler (Megatron's enums in ``args`` become
inert placeholders), and ranks ``pread`` only the ranges they are assigned.
"""

from __future__ import annotations

import os
import re
from argparse import Namespace
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import dist as rdist
from .. import faults
from ..errors import SourceError
from ..layout import Layout
from ..mapping import MappingTable
from ..models import table_for
from ..plan import TargetTensor
from ..spec import ModelSpec
from . import megatron as mg
from .base import TRANSPOSE, RawReader, SourceIndex, SourceSlice, StoredTensor
from .files import sync, torch_save
from .torchzip import TensorRef, parse_file

NAME = "megatron_legacy"
FILE = "model_optim_rng.pt"
_DIR_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def rank_dirname(tp: int, pp: int, layout: Layout, ep: int = 0) -> str:
    name = f"mp_rank_{tp:02d}"
    if layout.pp > 1:
        name += f"_{pp:03d}"
    if layout.ep > 1:
        name += f"_{ep:03d}"
    return name


def parse_dirname(groups: tuple, pp_size: int) -> Tuple[int, int, int]:
    """``(tp, pp, ep)`` of an ``mp_rank_*`` name's number groups: ``_PPP`` is there only when
    pp > 1, so with pp == 1 a second group is the EP rank."""
    t, a, b = groups
    if pp_size > 1:
        return t, a or 0, b or 0
    return t, 0, (b if b is not None else a) or 0


def model_keys(layout: Layout) -> List[str]:
    return ["model"] if layout.vp == 1 else [f"model{v}" for v in range(layout.vp)]


def _is_iter_dir(path: str) -> bool:
    try:
        return any(_DIR_RE.match(d) for d in os.listdir(path))
    except OSError:
        return False


def detect(path: str) -> bool:
    if _is_iter_dir(path):
        return True
    tracker = os.path.join(path, mg.TRACKER)
    if not os.path.isfile(tracker):
        return False
    for d in os.listdir(path):
        if (d == "release" or d.startswith("iter_")) and _is_iter_dir(os.path.join(path, d)):
            return True
    return False


# ------------------------------------------------------------------------- reading

def _plain(x):
    """Only plain values survive (they travel between ranks): placeholders become their repr."""
    if isinstance(x, (str, int, float, bool, type(None), torch.dtype, TensorRef)):
        return x
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, Namespace):
        return Namespace(**{k: _plain(v) for k, v in vars(x).items()})
    return repr(x)


def _parse_one(path: str):
    """What the index needs from one rank file: args and the model dicts (optimizer and RNG
    state are skipped - they are not model weights)."""
    obj = parse_file(path)
    if not isinstance(obj, dict):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not a Megatron checkpoint dict")
    keep = {k: v for k, v in obj.items()
            if k in ("args", "iteration", "checkpoint_version", "reshard") or re.fullmatch(r"model\d*", k)}
    return _plain(keep)


def _layer_names(entry, local: int) -> Tuple[str, ...]:
    names = [f"decoder.layers.{local}.{entry.mcore}"]
    if entry.local:
        names.append(f"decoder.layers.{local}.{entry.local}")
    return tuple(names)


def read_index(root: str, iteration: Optional[int] = None, vocab_size: Optional[int] = None) -> SourceIndex:
    ckpt, it = mg.checkpoint_dir(root, iteration, _is_iter_dir)
    dirs = {}
    for d in sorted(os.listdir(ckpt)):
        m = _DIR_RE.match(d)
        if m and os.path.isdir(os.path.join(ckpt, d)):
            dirs[d] = tuple(int(x) if x is not None else None for x in m.groups())
    if not dirs:
        raise SourceError(f"{ckpt} has no mp_rank_* directories")
    files = {d: os.path.join(ckpt, d, FILE) for d in dirs}
    absent = [f for f in files.values() if not os.path.isfile(f)]
    if absent:
        raise SourceError(f"{len(absent)} rank file(s) are missing: {', '.join(absent[:8])}")
    # Metadata of every file, parsed by the ranks in turn (each file's pickle once in the job).
    names = sorted(files)
    parsed = dict(zip(names, rdist.map_shared(lambda d: _parse_one(files[d]), names)))

    first = parsed[names[0]]
    spec = mg.spec_from_common(first, files[names[0]], vocab_size)
    src_layout = mg.layout_of_common(first, spec)
    _check_consistent(parsed, files, src_layout)
    _check_grid(dirs, src_layout, ckpt, spec.num_experts)
    table = table_for(spec)
    rel = lambda d: os.path.relpath(files[d], root)  # noqa: E731
    slices: Dict[str, List[SourceSlice]] = defaultdict(list)
    dtypes: Dict[str, torch.dtype] = {}
    problems: List[str] = []
    if spec.num_experts and src_layout.expert_tp != src_layout.tp:
        raise SourceError(f"{ckpt}: expert_tensor_parallel_size={src_layout.expert_tp} differs from "
                          f"tensor_model_parallel_size={src_layout.tp}; legacy checkpoints with a separate expert "
                          "TP are not read (convert from a torch_dist save of the run instead)")
    E_local = spec.num_experts // src_layout.ep if spec.num_experts else 0
    for d in names:
        tp, pp, ep = parse_dirname(dirs[d], src_layout.pp)
        obj = parsed[d]
        for v, mkey in enumerate(model_keys(src_layout)):
            model = obj.get(mkey)
            if not isinstance(model, dict):
                have = sorted(k for k in obj if k.startswith("model"))
                problems.append(f"{files[d]}: no {mkey!r} entry (has {have}); "
                                f"args say vpp={src_layout.vpp}")
                continue
            used = set()
            pre = pp == 0 and v == 0
            post = pp == src_layout.pp - 1 and v == src_layout.vp - 1
            wanted = []  # (entry, layer, candidate names, local layer, local expert)
            for e in table.top:
                if not e.applies(spec):
                    continue
                if (e.mcore.startswith("embedding.") and pre) or (not e.mcore.startswith("embedding.") and post):
                    wanted.append((e, None, (e.mcore,), None, None))
            for e, i, j, local in _file_layers(spec, src_layout, table, pp, v, ep):
                if e.expert is None:
                    wanted.append((e, i, _layer_names(e, j), j, None))
                else:
                    wanted.append((e, i, (f"decoder.layers.{j}.{e.mcore.format(j=local)}",
                                          f"decoder.layers.{j}.{e.grouped.format(j=local)}"), j, local))
            for e, i, cands, j, local in wanted:
                key = next((c for c in cands if c in model), None)
                old_form = None
                if key is None and local is not None:  # Megatron's removed GroupedMLP: weight1/weight2
                    old_form = f"decoder.layers.{j}.mlp.experts.weight{1 if e.tp_rule == 'gated' else 2}"
                    key = old_form if old_form in model else None
                if key is None:
                    what = f" (layer {i} expert {e.expert})" if local is not None else ""
                    problems.append(f"{files[d]} [{mkey}]: {cands[0]} is absent{what}")
                    continue
                used.add(key)
                ref = model[key]
                if not isinstance(ref, TensorRef):
                    problems.append(f"{files[d]} [{mkey}]: {key} is not a tensor")
                    continue
                exp, origin = mg.local_shape(e, spec, src_layout), None
                if old_form:  # [h, E_local*2f] / [E_local*f, h]: experts side by side, transposed
                    (R, C), gated = exp, e.tp_rule == "gated"
                    exp = (C, E_local * R) if gated else (E_local * C, R)
                    origin = (0, local * R) if gated else (local * C, 0)  # where this expert's block starts
                if e.tp_rule == "vocab":  # padded for the source tp; the padding is never read
                    exp = (ref.shape[0],) + exp[1:]
                    if ref.shape[0] * src_layout.tp < spec.vocab_size:
                        problems.append(f"{files[d]}: {key} has {ref.shape[0]} rows x tp={src_layout.tp}, fewer "
                                        f"than vocab_size={spec.vocab_size}")
                        continue
                if tuple(ref.shape) != exp:
                    problems.append(f"{files[d]} [{mkey}]: {key} has shape {tuple(ref.shape)}, the args imply {exp}")
                    continue
                if not ref.contiguous:
                    problems.append(f"{files[d]}: {key} is stored non-contiguous")
                    continue
                if (e.tp_rule == "replicated" and tp != 0) or (local is None and ep != 0):
                    continue  # the same values are read from TP rank 0's (EP rank 0's) file
                st = StoredTensor(rel(d), f"{mkey}/{key}", tuple(ref.shape), ref.dtype, ref.offset)
                rows = ref.shape[0] * src_layout.tp if e.tp_rule == "vocab" else None
                for pl in mg.local_placements(e, spec, src_layout, tp, i, reading=True, rows=rows):
                    if origin:  # local (r, c) is stored at origin + (c, r)
                        r, c = pl.dst_off
                        slices[pl.canonical].append(SourceSlice(st, pl.c_off, (origin[0] + c, origin[1] + r),
                                                                pl.c_size, TRANSPOSE))
                    else:
                        slices[pl.canonical].append(SourceSlice(st, pl.c_off, pl.dst_off, pl.c_size))
                    dtypes[pl.canonical] = ref.dtype
            # The tied output layer's copy on the last stage, _extra_state: known, not read.
            for key in model:
                if key in used or key.endswith("_extra_state") or (
                        key == "output_layer.weight" and spec.tie_word_embeddings and post):
                    continue
                problems.append(f"{files[d]} [{mkey}]: unknown tensor {key} (refusing to drop it silently)")
    if problems:
        raise SourceError(f"{ckpt} is not a consistent Megatron legacy checkpoint:\n  - "
                          + "\n  - ".join(problems[:20]) + (f"\n  ... (+{len(problems) - 20} more)"
                                                              if len(problems) > 20 else ""))
    shapes = {n: e.part_shape(spec, role) for n, (e, role, _) in table.canonical_names(spec).items()}
    sizes = {os.path.relpath(f, root): os.path.getsize(f) for f in files.values()}
    index = SourceIndex(NAME, root, spec, shapes, dtypes, dict(slices), sizes, it)
    index.guessed = mg.GUESSED_FROM_ARGS if mg.spec_is_guessed(first) else ()
    index.source_layout = src_layout
    return index


def _check_consistent(parsed: Dict[str, dict], files: Dict[str, str], layout: Layout) -> None:
    ref_name = sorted(parsed)[0]
    ref = parsed[ref_name]
    ref_args = mg.model_args_dict(ref.get("args"))
    bad = []
    for d, obj in sorted(parsed.items()):
        args = mg.model_args_dict(obj.get("args"))
        diff = [f"{k}={args[k]!r} (vs {ref_args[k]!r})" for k in ref_args if args[k] != ref_args[k]]
        if obj.get("iteration") != ref.get("iteration"):
            diff.append(f"iteration={obj.get('iteration')!r} (vs {ref.get('iteration')!r})")
        if diff:
            bad.append(f"{files[d]}: " + ", ".join(diff))
    if bad:
        raise SourceError(f"the rank files disagree with {files[ref_name]} (a file from another checkpoint "
                          "or another run?):\n  - " + "\n  - ".join(bad))


def _check_grid(dirs: Dict[str, tuple], layout: Layout, ckpt: str, num_experts: int = 0) -> None:
    want = {rank_dirname(t, p, layout, e): (t, p, e)
            for t in range(layout.tp) for p in range(layout.pp) for e in range(layout.ep)}
    have = set(dirs)
    missing, extra = sorted(set(want) - have), sorted(have - set(want))
    if missing or extra:
        msg = (f"{ckpt}: the mp_rank grid does not match args (tp={layout.tp}, pp={layout.pp}"
               + (f", ep={layout.ep}" if layout.ep > 1 else "") + ")")
        if missing:
            msg += f"; missing: {', '.join(missing)}"
            eps = sorted({want[m][2] for m in missing})
            if layout.ep > 1 and num_experts:
                n = num_experts // layout.ep
                msg += "; missing experts: " + ", ".join(f"{r * n}..{(r + 1) * n - 1} (EP rank {r})" for r in eps)
        if extra:
            msg += f"; unexpected: {', '.join(extra)}"
        raise SourceError(msg)


class Reader(RawReader):
    """Tensor bytes of a torch.save file are C-order storages at known offsets: the raw reader."""


# ------------------------------------------------------------------------- writing

def _file_layers(spec: ModelSpec, layout: Layout, table: MappingTable, pp: int, v: int, ep: int):
    """``(entry, global layer, local layer, local expert)`` of one file's ``model``/``modelK``:
    every non-expert layer tensor, and the experts of EP rank ``ep`` under local indices."""
    E = spec.num_experts
    for j, i in enumerate(layout.stage_layers(spec.num_layers)[pp][v]):
        for e in table.layer:
            if not e.applies(spec):
                continue
            if e.expert is None:
                yield e, i, j, None
                continue
            r, local = layout.expert_rank(e.expert, E)
            if r == ep:
                yield e, i, j, local


def targets(spec: ModelSpec, layout: Layout, table: MappingTable, dtype_of: Callable[[str], torch.dtype],
            impl: str = "transformer_engine", grouped: bool = False) -> List[TargetTensor]:
    """The local tensors of every file at the target layout (``mp_rank_TT[_PPP][_EEE]``; with
    EP every file holds the whole non-expert model of its TP/PP rank and its EP rank's experts)."""
    out = []
    embed = next(e for e in table.top if e.mcore.startswith("embedding."))
    for pp in range(layout.pp):
        for ep in range(layout.ep):
            for t in range(layout.tp):
                file = f"{rank_dirname(t, pp, layout, ep)}/{FILE}"
                for v, mkey in enumerate(model_keys(layout)):
                    pre = pp == 0 and v == 0
                    post = pp == layout.pp - 1 and v == layout.vp - 1
                    items = []
                    for e in table.top:
                        if e.applies(spec) and ((e.mcore.startswith("embedding.") and pre)
                                                or (not e.mcore.startswith("embedding.") and post)):
                            items.append((e, None, e.mcore))
                    if post and spec.tie_word_embeddings and layout.pp > 1:
                        items.append((embed, None, "output_layer.weight"))  # the tied copy Megatron keeps
                    for e, i, j, local in _file_layers(spec, layout, table, pp, v, ep):
                        items.append((e, i, f"decoder.layers.{j}.{e.megatron_name(local, grouped, impl)}"))
                    for e, i, name in items:
                        pls = mg.local_placements(e, spec, layout, t, i)
                        dts = {dtype_of(p.canonical) for p in pls}
                        assert len(dts) == 1, (name, dts)
                        out.append(TargetTensor(f"{file}::{mkey}/{name}", mg.local_shape(e, spec, layout),
                                                dts.pop(), pls, rule=e.tp_rule, file=file, name=f"{mkey}/{name}"))
    return out


def extra_state_names(spec: ModelSpec, layout: Layout, table: MappingTable, pp: int, v: int,
                      grouped: bool = False) -> List[str]:
    """``_extra_state`` entries Megatron's ``state_dict()`` has (``None`` without FP8)."""
    out = []
    for e, _, j, local in _file_layers(spec, layout, table, pp, v, 0):
        if not e.extra_state:
            continue
        if e.expert is None:
            out.append(f"decoder.layers.{j}.{e.extra_state}._extra_state")
        elif grouped:  # one TE GroupedLinear per fc
            name = f"decoder.layers.{j}.{e.grouped.rsplit('.', 1)[0]}._extra_state"
            if name not in out:
                out.append(name)
        else:
            out.append(f"decoder.layers.{j}.{e.extra_state.format(j=local)}._extra_state")
    if pp == layout.pp - 1 and v == layout.vp - 1:
        out.append("output_layer._extra_state")
    return out


def write_file(ckpt_dir: str, file: str, tensors: Dict[str, torch.Tensor], spec: ModelSpec, layout: Layout,
               table: MappingTable, common: dict, fsync: bool) -> int:
    """One ``model_optim_rng.pt``: args etc. from ``common``, then ``model``/``modelK`` dicts."""
    m = _DIR_RE.match(file.split("/")[0])
    pp = parse_dirname(tuple(int(x) if x else None for x in m.groups()), layout.pp)[1]
    obj = {k: common[k] for k in ("args", "checkpoint_version", "iteration", "reshard")}
    for v, mkey in enumerate(model_keys(layout)):
        model = {}
        for name, t in tensors.items():
            if name.startswith(mkey + "/"):
                model[name[len(mkey) + 1:]] = t
        for name in extra_state_names(spec, layout, table, pp, v, bool(common["reshard"]["layout"].get(
                "moe_grouped_gemm"))):
            model[name] = None
        obj[mkey] = model
    path = os.path.join(ckpt_dir, file)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        torch_save(obj, f, path)
        faults.point("write")
        sync(f, fsync)
    return sum(t.nbytes for t in tensors.values())
