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

import dataclasses
import os
import re
from argparse import Namespace
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import dist as rdist
from .. import optim
from ..errors import SourceError
from ..layout import Layout
from ..mapping import MappingTable
from ..models import table_for
from ..types import TargetTensor
from ..spec import ModelSpec
from . import dist_opt
from . import megatron as mg
from .base import TRANSPOSE, RawReader, SourceIndex, SourceSlice, StoredTensor
from .target import TorchSaveTarget
from .torchzip import TensorRef, parse_file, read_scalar, stored_tensors

NAME = "megatron_legacy"
ITERATIONS = True
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
    """What the index needs from one rank file: args and the model dicts; and the tensor bytes of each
    other entry (optimizer and RNG state: not model weights, not converted, reported)."""
    obj = parse_file(path)
    if not isinstance(obj, dict):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not a Megatron checkpoint dict")
    keep = {k: v for k, v in obj.items()
            if k in ("args", "iteration", "checkpoint_version", "reshard") or re.fullmatch(r"model\d*", k)}
    others = {k: _tensor_bytes(v) for k, v in obj.items() if k not in keep}
    keep.update({k: obj[k] for k in _CARRIED if k in obj})  # what a kept optimizer state carries
    return _plain(keep), others


# training state in model_optim_rng.pt that no target carries (what Megatron saves beside the model)
_TRAINING_STATE = {"optimizer": "optimizer state", "opt_param_scheduler": "learning-rate scheduler state",
                   "rng_state": "RNG state", "rerun_state_machine": "rerun state machine",
                   "num_floating_point_operations_so_far": "FLOPs counter"}


# training state read when the optimizer state is carried (reshard/formats/dist_opt.py)
_CARRIED = ("optimizer", "opt_param_scheduler")


def _tensor_bytes(x) -> int:
    if isinstance(x, TensorRef):
        n = x.dtype.itemsize
        for s in x.shape:
            n *= s
        return n
    if isinstance(x, dict):
        return sum(_tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(v) for v in x)
    return 0


def _not_carried(others: Dict[str, dict], files: Dict[str, str]) -> Dict[str, dict]:
    """The rank files' entries besides the model (per kind: files, tensor bytes) and ``distrib_optim.pt``."""
    out: Dict[str, dict] = {}
    for d, other in others.items():
        for k, nbytes in other.items():
            kind = _TRAINING_STATE.get(k, f"entry {k!r}")
            e = out.setdefault(kind, {"entries": 0, "bytes": 0, "where": f"'{k}' in {FILE}"})
            e["entries"] += 1
            e["bytes"] += nbytes
        opt = os.path.join(os.path.dirname(files[d]), "distrib_optim.pt")
        if os.path.isfile(opt):
            e = out.setdefault("distributed optimizer state", {"entries": 0, "bytes": 0, "where": "distrib_optim.pt"})
            e["entries"] += 1
            e["bytes"] += os.path.getsize(opt)
    return out


def _layer_names(table: MappingTable, entry, local: int) -> Tuple[str, ...]:
    return tuple(table.layer_key(local, n) for n in (entry.mcore, entry.local) if n)


def read_index(root: str, iteration: Optional[int] = None, vocab_size: Optional[int] = None) -> SourceIndex:
    """The rank files' object trees, the spec and layout from their args, then each file's tensors
    matched against what its TP/PP/EP rank must hold."""
    ckpt, it = mg.checkpoint_dir(root, iteration, _is_iter_dir)
    dirs, files = _rank_files(ckpt)
    names = sorted(files)
    # Metadata of every file, parsed by the ranks in turn (each file's pickle once in the job).
    both = dict(zip(names, rdist.map_shared(lambda d: _parse_one(files[d]), names)))
    parsed, others = {d: b[0] for d, b in both.items()}, {d: b[1] for d, b in both.items()}
    first = parsed[names[0]]
    keys = {k: tuple(v.shape) for obj in parsed.values() for mk, model in obj.items()
            if re.fullmatch(r"model\d*", mk) and isinstance(model, dict)
            for k, v in model.items() if isinstance(v, TensorRef)}
    spec = mg.spec_from_common(first, files[names[0]], vocab_size, keys)
    src_layout = mg.layout_of_common(first, spec)
    _check_consistent(parsed, files, src_layout)
    _check_grid(dirs, src_layout, ckpt, spec.num_experts)
    if spec.num_experts and src_layout.expert_tp != src_layout.tp:
        raise SourceError(f"{ckpt}: expert_tensor_parallel_size={src_layout.expert_tp} differs from "
                          f"tensor_model_parallel_size={src_layout.tp}; legacy checkpoints with a separate expert "
                          "TP are not read (convert from a torch_dist save of the run instead)")
    table = table_for(spec)
    found = _Found(defaultdict(list), {}, [])
    for d in names:
        tp, pp, ep = parse_dirname(dirs[d], src_layout.pp)
        for v, mkey in enumerate(model_keys(src_layout)):
            model = parsed[d].get(mkey)
            if not isinstance(model, dict):
                have = sorted(k for k in parsed[d] if k.startswith("model"))
                found.problems.append(f"{files[d]}: no {mkey!r} entry (has {have}); args say vpp={src_layout.vpp}")
                continue
            ctx = _FileCtx(spec, src_layout, f"{files[d]} [{mkey}]", os.path.relpath(files[d], root), mkey, tp, ep)
            used = set()
            for want in _wanted(spec, src_layout, table, pp, v, ep):
                key = _read_entry(ctx, model, want, found)
                if key:
                    used.add(key)
            post = pp == src_layout.pp - 1 and v == src_layout.vp - 1
            found.problems += _unknown(model, used, f"{files[d]} [{mkey}]", spec.tie_word_embeddings and post)
    if found.problems:
        p = found.problems
        raise SourceError(f"{ckpt} is not a consistent Megatron legacy checkpoint:\n  - " + "\n  - ".join(p[:20])
                          + (f"\n  ... (+{len(p) - 20} more)" if len(p) > 20 else ""))
    shapes = {n: e.part_shape(spec, role) for n, (e, role, _) in table.canonical_names(spec).items()}
    sizes = {os.path.relpath(f, root): os.path.getsize(f) for f in files.values()}
    index = SourceIndex(NAME, root, spec, shapes, found.dtypes, dict(found.slices), sizes, it)
    index.guessed = mg.guessed_fields(first, spec)
    index.source_layout = src_layout
    index.not_carried = _not_carried(others, files)
    emb = keys.get("embedding.word_embeddings.weight") or keys.get("output_layer.weight")
    index.vocab_rows = emb[0] * src_layout.tp if emb else None
    if "optimizer" in first:
        index.optimizer = _optimizer(index, ckpt, root, table, src_layout, parsed, dirs, files)
    return index


def _optimizer(index: SourceIndex, ckpt: str, root: str, table: MappingTable, layout: Layout, parsed, dirs, files):
    """The distributed optimizer's state: the param groups of the rank files' ``optimizer`` entry and the
    tensors of each ``mp_rank_*/distrib_optim.pt``, decoded into shadow slices; what cannot be decoded is a
    problem (an error only when the state is to be kept). The non-distributed optimizer's ``optimizer``
    entry is not decoded in this version (named, and refused with optimizer=keep)."""
    spec = index.spec
    first = parsed[sorted(parsed)[0]]
    args = first.get("args")
    info = {"kinds": [], "sharding": "distrib_optim.pt", "state": first["optimizer"], "problems": [], "tensors": 0,
            "scheduler": first.get("opt_param_scheduler"), "args": args}
    if not mg._get(args, "use_distributed_optimizer", default=False):
        info["sharding"] = optim.NON_DISTRIBUTED
        entry = first["optimizer"] if isinstance(first["optimizer"], dict) else {}
        sd = entry.get("optimizer", entry) if "fp32_from_fp16_params" in entry else entry
        info["state"] = {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                          for g in sd.get("param_groups", []) if isinstance(g, dict)]}
        if "grad_scaler" in entry:
            info["state"]["grad_scaler"] = entry["grad_scaler"]
        try:
            dist_opt.check_decodable(spec, layout, ckpt)
            slices, info["step"] = _non_distributed(index, ckpt, root, table, layout, parsed, dirs, files)
        except SourceError as e:
            info["problems"].append(str(e))
            return info
        return dist_opt.attach(index, info, slices, {optim.split(n)[0] for n in slices})
    if layout.ep > 1 or spec.is_moe:
        info["problems"].append(f"{ckpt}: the distributed optimizer state of a mixture of experts is not decoded "
                                "in this version")
        return info
    paths, missing = {}, []
    for d in sorted(dirs):
        t, p, _ = parse_dirname(dirs[d], layout.pp)
        path = os.path.join(os.path.dirname(files[d]), "distrib_optim.pt")
        if not os.path.isfile(path):
            missing.append(path)
        paths[(t, p)] = path
    if missing:
        info["problems"].append(f"{len(missing)} distrib_optim.pt file(s) missing (the distributed optimizer's "
                                f"tensors; use_distributed_optimizer is set): {', '.join(missing[:4])}")
        return info
    keys = sorted(paths)
    trees = dict(zip(keys, rdist.map_shared(lambda k: _parse_dist_opt(paths[k]), keys)))
    try:
        bad = [trees[k] for k in keys if isinstance(trees[k], str)]
        if bad:
            raise SourceError(bad[0])
        found = {k: (os.path.relpath(paths[k], root), trees[k], os.path.getsize(paths[k])) for k in keys}
        key = next(iter(trees[keys[0]].get(0) or {}), None)
        info["grad_dtype"] = key[1] if isinstance(key, tuple) and len(key) == 2 else None
        slices = dist_opt.decode_dp_zero(spec, table, layout, args, found, ckpt)
    except SourceError as e:
        info["problems"].append(str(e))
        return info
    return dist_opt.attach(index, info, slices, {optim.split(n)[0] for n in slices})


def param_groups_members(params: list, groups: list, where: str) -> List[list]:
    """The parameters of each of the optimizer's param groups, in order (their ids are their positions, group
    after group): Megatron-core's default groups - no weight decay (``wd_mult`` 0) for biases and 1-D
    parameters, the rest with it (``_get_param_groups``). Groups this rule does not explain are refused."""
    nowd = [p for p in params if len(p.shape) == 1 or p.name.endswith(".bias")]
    wd = [p for p in params if not (len(p.shape) == 1 or p.name.endswith(".bias"))]
    mults = [g.get("wd_mult", 1.0) if isinstance(g, dict) else None for g in groups]
    if sorted(mults) not in ([0.0, 1.0], [1.0], [0.0]):
        raise SourceError(f"{where}: param groups with wd_mult {mults}; Megatron-core's default groups (weight "
                          "decay, none for biases and 1-D parameters) are decoded, other overrides are not")
    return [nowd if m == 0.0 else wd for m in mults]


def _non_distributed(index: SourceIndex, ckpt: str, root: str, table: MappingTable, layout: Layout, parsed, dirs,
                     files):
    """Each rank file's ``optimizer`` entry: torch Adam's state of the rank's local shards (FP32Optimizer), or
    that state under ``optimizer`` with the fp32 master weights in ``fp32_from_fp16_params`` (Float16Optimizer).
    Its ids are matched to the parameters by Megatron's param groups; every state's shape is checked."""
    spec = index.spec
    args = parsed[sorted(parsed)[0]].get("args")
    impl = str(mg._get(args, "transformer_impl", default="transformer_engine"))
    rows = index.vocab_rows
    out: Dict[str, List[SourceSlice]] = {}
    steps = set()
    for d in sorted(dirs):
        t, pp, _ = parse_dirname(dirs[d], layout.pp)
        entry, where = parsed[d].get("optimizer"), files[d]
        masters = entry.get("fp32_from_fp16_params") if isinstance(entry, dict) else None
        sd = entry.get("optimizer") if masters is not None else entry
        if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or "param_groups" not in sd:
            raise SourceError(f"{where}: its 'optimizer' entry is not a torch optimizer state (state, param_groups)")
        params = [p for v in range(layout.vp) for p in dist_opt.chunk_params(spec, layout, table, pp, v, impl, rows)]
        groups = param_groups_members(params, sd["param_groups"], where)
        rel = os.path.relpath(where, root)
        for g, (group, members) in enumerate(zip(sd["param_groups"], groups)):
            ids = group.get("params", [])
            if len(ids) != len(members):
                raise SourceError(f"{where}: param group {g} holds {len(ids)} parameters; the model's rank has "
                                  f"{len(members)} {'without' if group.get('wd_mult') == 0.0 else 'with'} weight decay")
            for j, (pid, p) in enumerate(zip(ids, members)):
                st = sd["state"].get(pid, {})
                refs = {k: st.get(k) for k in ("exp_avg", "exp_avg_sq")}
                if masters is not None:
                    refs["fp32_param"] = masters[g][j]
                for kind, ref in refs.items():
                    if not isinstance(ref, TensorRef) or tuple(ref.shape) != p.shape or not ref.contiguous:
                        raise SourceError(f"{where}: the {kind} of parameter {pid} ({p.name}) is "
                                          f"{getattr(ref, 'shape', ref)}, the parameter {p.shape}")
                if isinstance(st.get("step"), TensorRef):
                    steps.add(read_scalar(where, st["step"]))
                pls = dist_opt.read_placements(p, spec, layout, t, rows)
                if pls is None:
                    continue
                for kind, ref in refs.items():
                    stored = StoredTensor(rel, f"optimizer/{pid}/{kind}", tuple(ref.shape), ref.dtype, ref.offset)
                    for pl in pls:
                        out.setdefault(optim.shadow(kind, pl.canonical), []).append(
                            SourceSlice(stored, pl.c_off, pl.dst_off, pl.c_size))
    if len(steps) > 1:
        raise SourceError(f"{ckpt}: the parameters' Adam steps differ ({sorted(steps)})")
    return out, (steps.pop() if steps else None)


def _parse_dist_opt(path: str):
    """``distrib_optim.pt``'s tree (tensors as references), or the reason it cannot be read."""
    try:
        return _plain(parse_file(path))
    except SourceError as e:
        return str(e)


def _rank_files(ckpt: str) -> Tuple[Dict[str, tuple], Dict[str, str]]:
    """``mp_rank_*`` directory -> its number groups, and -> its ``model_optim_rng.pt`` (all present)."""
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
    return dirs, files


@dataclass
class _Found:
    """What the rank files yield: canonical name -> slices and dtype, and every problem seen."""

    slices: Dict[str, List[SourceSlice]]
    dtypes: Dict[str, torch.dtype]
    problems: List[str]


@dataclass
class _FileCtx:
    spec: ModelSpec
    layout: Layout
    where: str  # "<file> [<model key>]", for messages
    rel: str  # the file, relative to the checkpoint root
    mkey: str
    tp: int
    ep: int


@dataclass
class _Want:
    """A tensor one model dict must hold: its entry, global layer, the names it may have, and
    (experts) its local layer and local expert index."""

    entry: object
    layer: Optional[int]
    names: Tuple[str, ...]
    local_layer: Optional[int] = None
    local_expert: Optional[int] = None


def top_entries(spec: ModelSpec, layout: Layout, table: MappingTable, pp: int, v: int) -> list:
    """The non-layer entries of one model chunk: the embedding on the first, the rest (final norm,
    output layer) on the last."""
    pre = pp == 0 and v == 0
    post = pp == layout.pp - 1 and v == layout.vp - 1
    return [e for e in table.top if e.applies(spec) and (pre if e.mcore.startswith("embedding.") else post)]


def _wanted(spec: ModelSpec, layout: Layout, table: MappingTable, pp: int, v: int, ep: int) -> List[_Want]:
    out = [_Want(e, None, (e.mcore,)) for e in top_entries(spec, layout, table, pp, v)]
    for e, i, j, local in file_layers(spec, layout, table, pp, v, ep):
        if e.expert is None:
            out.append(_Want(e, i, _layer_names(table, e, j), j))
        else:
            out.append(_Want(e, i, (table.layer_key(j, e.mcore.format(j=local)),
                                    table.layer_key(j, e.grouped.format(j=local))), j, local))
    return out


def _read_entry(ctx: _FileCtx, model: dict, w: _Want, found: _Found) -> Optional[str]:
    """Find ``w`` in ``model``, check its shape, add its slices; returns the key it was found under."""
    e, spec, layout = w.entry, ctx.spec, ctx.layout
    key = next((c for c in w.names if c in model), None)
    old_form = None
    if key is None and w.local_expert is not None:  # Megatron's removed GroupedMLP: weight1/weight2
        old_form = w.names[0].split(".mlp.")[0] + f".mlp.experts.weight{1 if e.tp_rule == 'gated' else 2}"
        key = old_form if old_form in model else None
    if key is None:
        what = f" (layer {w.layer} expert {e.expert})" if w.local_expert is not None else ""
        found.problems.append(f"{ctx.where}: {w.names[0]} is absent{what}")
        return None
    ref = model[key]
    if not isinstance(ref, TensorRef):
        found.problems.append(f"{ctx.where}: {key} is not a tensor")
        return key
    exp, origin = mg.local_shape(e, spec, layout), None
    if tuple(ref.shape) != exp and e.local_tp_rule and tuple(ref.shape) == mg.local_shape(e.under("local"), spec, layout):
        e = e.under("local")  # a local-spec file: this tensor split the local spec's way
        exp = mg.local_shape(e, spec, layout)
    if old_form:  # [h, E_local*2f] / [E_local*f, h]: experts side by side, transposed
        (R, C), gated, E_local = exp, e.tp_rule == "gated", spec.num_experts // layout.ep
        exp = (C, E_local * R) if gated else (E_local * C, R)
        origin = (0, w.local_expert * R) if gated else (w.local_expert * C, 0)  # where this expert's block starts
    if e.tp_rule == "vocab":  # padded for the source tp; the padding is never read
        exp = (ref.shape[0],) + exp[1:]
        if ref.shape[0] * layout.tp < spec.vocab_size:
            found.problems.append(f"{ctx.where}: {key} has {ref.shape[0]} rows x tp={layout.tp}, fewer "
                                  f"than vocab_size={spec.vocab_size}")
            return key
    if tuple(ref.shape) != exp:
        found.problems.append(f"{ctx.where}: {key} has shape {tuple(ref.shape)}, the args imply {exp}")
        return key
    if not ref.contiguous:
        found.problems.append(f"{ctx.where}: {key} is stored non-contiguous")
        return key
    if (e.tp_rule == "replicated" and ctx.tp != 0) or (w.local_expert is None and ctx.ep != 0):
        return key  # the same values are read from TP rank 0's (EP rank 0's) file
    st = StoredTensor(ctx.rel, f"{ctx.mkey}/{key}", tuple(ref.shape), ref.dtype, ref.offset)
    rows = ref.shape[0] * layout.tp if e.tp_rule == "vocab" else None
    for pl in mg.local_placements(e, spec, layout, ctx.tp, w.layer, reading=True, rows=rows):
        if origin:  # local (r, c) is stored at origin + (c, r)
            r, c = pl.dst_off
            found.slices[pl.canonical].append(SourceSlice(st, pl.c_off, (origin[0] + c, origin[1] + r),
                                                          pl.c_size, TRANSPOSE))
        else:
            found.slices[pl.canonical].append(SourceSlice(st, pl.c_off, pl.dst_off, pl.c_size))
        found.dtypes[pl.canonical] = ref.dtype
    return key


def _unknown(model: dict, used: set, where: str, tied_copy_here: bool) -> List[str]:
    """Tensors of ``model`` nothing claimed; the tied output layer's copy on the last stage and
    ``_extra_state`` are known and not read."""
    return [f"{where}: unknown tensor {key} (refusing to drop it silently)" for key in model
            if key not in used and not key.endswith("_extra_state")
            and not (key == "output_layer.weight" and tied_copy_here)]


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


def stored(path: str) -> list:
    """Every tensor of the ``model*`` entries of every rank file (``reshard inspect``)."""
    ckpt, _ = mg.checkpoint_dir(path, None, _is_iter_dir)
    files = sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(ckpt) for f in fs if f == FILE)
    out = stored_tensors(path, files, lambda o: {k: v for k, v in o.items() if k.startswith("model")})
    # the distributed optimizer's flat buffers beside each rank file (master weights and Adam's moments)
    opt = [os.path.join(os.path.dirname(f), "distrib_optim.pt") for f in files]
    return out + stored_tensors(path, [f for f in opt if os.path.isfile(os.path.join(path, f))],
                                lambda o: {"distrib_optim": {k: v for k, v in o.items() if isinstance(k, int)}})


# ------------------------------------------------------------------------- writing

def file_layers(spec: ModelSpec, layout: Layout, table: MappingTable, pp: int, v: int, ep: int):
    """``(entry, global layer, local layer, local expert)`` of one file's ``model``/``modelK``:
    every non-expert layer tensor, and the experts of EP rank ``ep`` under local indices."""
    E = spec.num_experts
    for j, i in enumerate(layout.stage_layers(spec.num_layers)[pp][v]):
        for e in table.layer:
            if not e.applies(spec, i):
                continue
            if e.expert is None:
                yield e, i, j, None
                continue
            r, local = layout.expert_rank(e.expert, E)
            if r == ep:
                yield e, i, j, local


def rank_items(spec: ModelSpec, layout: Layout, table: MappingTable, pp: int, v: int, ep: int,
               impl: str = "transformer_engine", grouped: bool = False, tied_copy: bool = True):
    """``(entry, global layer or None, name)`` of every tensor of one model chunk of a model-parallel
    rank, named as Megatron-core's ``state_dict()`` names them there (stage-local layer numbers; with
    ``tied_copy`` the last stage's copy of a tied embedding, ``output_layer.weight``)."""
    items = [(e, None, e.mcore) for e in top_entries(spec, layout, table, pp, v)]
    if tied_copy and pp == layout.pp - 1 and v == layout.vp - 1 and spec.tie_word_embeddings and layout.pp > 1:
        items.append((next(e for e in table.top if e.mcore.startswith("embedding.")), None, "output_layer.weight"))
    for e, i, j, local in file_layers(spec, layout, table, pp, v, ep):
        items.append((e.under(impl), i, table.layer_key(j, e.megatron_name(local, grouped, impl))))
    return items


def targets(spec: ModelSpec, layout: Layout, table: MappingTable, dtype_of: Callable[[str], torch.dtype],
            impl: str = "transformer_engine", grouped: bool = False) -> List[TargetTensor]:
    """The local tensors of every file at the target layout (``mp_rank_TT[_PPP][_EEE]``; with
    EP every file holds the whole non-expert model of its TP/PP rank and its EP rank's experts)."""
    out = []
    for pp in range(layout.pp):
        for ep in range(layout.ep):
            for t in range(layout.tp):
                file = f"{rank_dirname(t, pp, layout, ep)}/{FILE}"
                for v, mkey in enumerate(model_keys(layout)):
                    for e, i, name in rank_items(spec, layout, table, pp, v, ep, impl, grouped):
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
    for e, _, j, local in file_layers(spec, layout, table, pp, v, 0):
        if not e.extra_state:
            continue
        if e.expert is None:
            out.append(table.layer_key(j, f"{e.extra_state}._extra_state"))
        elif grouped:  # one TE GroupedLinear per fc
            name = table.layer_key(j, f"{e.grouped.rsplit('.', 1)[0]}._extra_state")
            if name not in out:
                out.append(name)
        else:
            out.append(table.layer_key(j, f"{e.extra_state.format(j=local)}._extra_state"))
    if pp == layout.pp - 1 and v == layout.vp - 1:
        out.append("output_layer._extra_state")
    return out


DIST_OPT = "distrib_optim.pt"


def buffer_dtypes(opt: dict, param_dtype: torch.dtype) -> tuple:
    """The ``(param dtype, grad dtype)`` key of the target run's buffers (Megatron keys ``distrib_optim.pt`` by
    it): the weights' dtype, and fp32 gradients where the source reduced them in fp32."""
    args = opt.get("args")
    fp32 = bool(mg._get(args, "grad_reduce_in_fp32", "accumulate_allreduce_grads_in_fp32", default=False)) or \
        opt.get("grad_dtype") == torch.float32
    return (param_dtype, torch.float32 if fp32 or param_dtype == torch.float32 else param_dtype)


def shadow_placements(p, kind: str, spec: ModelSpec, layout: Layout, t: int) -> list:
    """Where TP rank ``t``'s local tensor of parameter ``p`` takes its ``kind`` of optimizer state from: the
    weight's own placements, over the weight's shadows."""
    return [dataclasses.replace(x, canonical=optim.shadow(kind, x.canonical))
            for x in mg.local_placements(p.entry, spec, layout, t, p.layer)]


def optimizer_targets(ctx, dp: Optional[int]):
    """The distributed optimizer's state at the target layout: per TP x PP rank one ``distrib_optim.pt`` whose
    flat fp32 buffers (one per model chunk and kind) hold each parameter's local shard where Megatron-core's
    layout for the target puts it (reshard/formats/dist_opt.py). Returns the per-parameter target tensors
    (their bytes are written into the buffers in layout order) and ``{(file, chunk): BufferLayout}``."""
    spec, layout, table, opt = ctx.spec, ctx.layout, ctx.table, ctx.optimizer
    impl, args = ctx.cfg.target.transformer_impl, opt.get("args")
    out, buffers = [], {}
    for pp in range(layout.pp):
        for v in range(layout.vp):
            params = dist_opt.chunk_params(spec, layout, table, pp, v, impl)
            buf = dist_opt.layout_buffer(params, bucket_size=dist_opt.bucket_size(args, dp or 1, pp, v))
            for t in range(layout.tp):
                file = f"{rank_dirname(t, pp, layout)}/{DIST_OPT}"
                buffers[(file, v)] = buf
                for kind in opt["kinds"]:
                    for p in params:
                        pls = shadow_placements(p, kind, spec, layout, t)
                        name = f"{v}/{kind}/{p.name}"
                        out.append(TargetTensor(f"{file}::{name}", p.shape, torch.float32, pls, rule=p.entry.tp_rule,
                                                file=file, name=name))
    return out, buffers


def non_distributed_targets(ctx) -> Tuple[List[TargetTensor], Dict[int, List[int]]]:
    """The non-distributed optimizer's state at the target layout, in each rank file's ``optimizer`` entry:
    per parameter (ids in param-group order, :func:`param_groups_members`) its Adam moments and, for
    Float16Optimizer, its fp32 master weight (``fp32_param``). Also returns each stage's group sizes."""
    spec, layout, table, opt = ctx.spec, ctx.layout, ctx.table, ctx.optimizer
    out, sizes = [], {}
    for pp in range(layout.pp):
        params = [p for v in range(layout.vp)
                  for p in dist_opt.chunk_params(spec, layout, table, pp, v, ctx.cfg.target.transformer_impl)]
        groups = param_groups_members(params, opt["state"]["param_groups"], "the source")
        sizes[pp] = [len(g) for g in groups]
        for t in range(layout.tp):
            file = f"{rank_dirname(t, pp, layout)}/{FILE}"
            pid = 0
            for members in groups:
                for p in members:
                    for kind in opt["kinds"]:
                        pls = shadow_placements(p, kind, spec, layout, t)
                        name = f"optimizer/{kind}/{pid}"
                        out.append(TargetTensor(f"{file}::{name}", p.shape, torch.float32, pls, rule=p.entry.tp_rule,
                                                file=file, name=name))
                    pid += 1
    return out, sizes


def non_distributed_entry(opt: dict, tensors: dict) -> dict:
    """The ``optimizer`` entry of one rank file: torch Adam's ``state_dict()`` (FP32Optimizer), or that under
    ``optimizer`` with ``fp32_from_fp16_params`` (Float16OptimizerWithFloat16Params)."""
    state: Dict[int, dict] = {}
    for name, t in tensors.items():
        _, kind, pid = name.split("/")
        state.setdefault(int(pid), {})[kind] = t
    groups, first = [], 0
    sizes = opt["group_sizes"]
    for g, n in zip(opt["state"]["param_groups"], sizes):
        groups.append(dict(g, params=list(range(first, first + n))))
        first += n
    step = float(opt.get("step") or 0)
    sd = {"state": {i: {"step": torch.tensor(step), "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
                    for i, st in sorted(state.items())}, "param_groups": groups}
    if "fp32_param" not in opt["kinds"]:
        return sd
    masters = [[state[i]["fp32_param"] for i in g["params"]] for g in groups]
    return {"optimizer": sd, "fp32_from_fp16_params": masters, "grad_scaler": opt["state"].get("grad_scaler")}


class Target(TorchSaveTarget):
    """One ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` per model-parallel rank of the target
    layout: ``args`` etc. from the common state, then the ``model``/``modelK`` dicts. A carried
    optimizer state adds the ``optimizer`` entry (param groups), ``opt_param_scheduler`` and, beside
    each rank file, the distributed optimizer's ``distrib_optim.pt``."""

    name = NAME
    ckpt_format = "torch"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.subdir = mg.iteration_dirname(ctx.cfg.target.iteration)
        self.buffers, self.group_sizes = {}, {}

    def check(self) -> None:
        from ..errors import LayoutError

        spec, layout = self.ctx.spec, self.ctx.layout
        if spec.is_moe and layout.expert_tp != layout.tp:
            raise LayoutError(f"target.format=megatron_legacy: parallel.target_etp={layout.expert_tp} must equal "
                              f"target_tp={layout.tp} (Megatron names legacy files by TP and EP rank only); "
                              "write torch_dist for a separate expert TP")
        opt = self.ctx.optimizer
        if opt:
            try:
                dist_opt.check_decodable(spec, layout, "target.format=megatron_legacy")
            except SourceError as e:
                raise LayoutError(str(e).replace("is not decoded", "is not written")) from None
            args, dp = opt.get("args"), self.ctx.cfg.parallel.target_dp
            if opt["sharding"] != optim.NON_DISTRIBUTED and dp is None and \
                    mg._get(args, "overlap_grad_reduce", default=False) and \
                    mg._get(args, "ddp_bucket_size") is None:
                raise LayoutError("the source trained with --overlap-grad-reduce and no --ddp-bucket-size, so the "
                                  "bucket size of the resuming job (max(4e7, 1e6 x DP)) and the layout of its "
                                  "distrib_optim.pt depend on its data-parallel size: give parallel.target_dp=<DP>")

    def tensors(self):
        c = self.ctx
        out = targets(c.spec, c.layout, c.table, c.dtype_of, c.cfg.target.transformer_impl,
                      c.cfg.target.moe_grouped_gemm)
        if c.optimizer and c.optimizer["sharding"] == optim.NON_DISTRIBUTED:
            opt, self.group_sizes = non_distributed_targets(c)
            out += opt
        elif c.optimizer:
            opt, self.buffers = optimizer_targets(c, c.cfg.parallel.target_dp)
            out += opt
        return out

    def common(self, dtype: torch.dtype) -> dict:
        common = super().common(dtype)
        opt = self.ctx.optimizer
        if opt:
            mg.carry_training_state(common, opt, self.ctx.cfg.parallel.target_dp)
            # what distrib_optim.pt is, or the optimizer entry of the non-distributed optimizer
            common["args"].use_distributed_optimizer = opt["sharding"] != optim.NON_DISTRIBUTED
            state = {k: v for k, v in (opt["state"] or {}).items() if k != "param_state_sharding_type"}
            common["optimizer"] = state
            common["buffer_dtypes"] = buffer_dtypes(opt, dtype)
        return common

    def write_file(self, job, sink, file, items, emitter) -> int:
        if not file.endswith(DIST_OPT):
            return super().write_file(job, sink, file, items, emitter)
        return self._write_dist_opt(job, sink, file, items, emitter)

    def _write_dist_opt(self, job, sink, file, items, emitter) -> int:
        """``{"buckets_coalesced": True, chunk: {(param dtype, grad dtype): {kind: flat fp32, "numel_unpadded": n}}}``:
        each flat buffer streamed parameter by parameter in layout order, zeros in the alignment gaps."""
        from .files import Payload, crc32, save_streamed, torch_save, write_tensor

        by_name = {t.name: (t, ps) for t, ps in items}
        kinds = job.optimizer["kinds"]
        bufs = sorted(v for f, v in self.buffers if f == file)

        def order(v, kind):  # (gap before, tensor, pieces) in file order, then the last gap
            buf, runs = self.buffers[(file, v)], []
            for b in range(len(buf.unpadded)):
                pos = 0
                for p in sorted(buf.bucket_params(b), key=lambda p: buf.ranges[p.name][1]):
                    start, end = buf.ranges[p.name][1:]
                    runs.append((start - pos, *by_name[f"{v}/{kind}/{p.name}"]))
                    pos = end
                runs.append((buf.unpadded[b] - pos, None, None))
            return runs

        def emit(s, v, kind):
            kernel = 0
            for gap, t, ps in order(v, kind):
                if gap:
                    write_tensor(s, torch.zeros(gap, dtype=torch.float32))
                if t is not None:
                    kernel += emitter.emit(s, t, ps)
            return kernel

        def make(holders):
            it = iter(holders)
            obj = {"buckets_coalesced": True}
            for v in bufs:
                n = sum(self.buffers[(file, v)].unpadded)
                entry = {kind: next(it) for kind in kinds}
                entry["numel_unpadded"] = n
                obj[v] = {job.common["buffer_dtypes"]: entry}
            return obj

        keys = [(v, kind) for v in bufs for kind in kinds]
        if not self.io.crc32:
            payloads = [Payload(torch.float32, (sum(self.buffers[(file, v)].unpadded),),
                                4 * sum(self.buffers[(file, v)].unpadded), lambda s, v=v, k=kind: emit(s, v, k))
                        for v, kind in keys]
            with crc32(False):
                got = save_streamed(make, payloads, sink)
            if got is not None:
                return got
        flats = []
        for v, kind in keys:
            parts = []
            for gap, t, ps in order(v, kind):
                parts.append(torch.zeros(gap, dtype=torch.float32))
                if t is not None:
                    parts.append(emitter.build(t, ps).reshape(-1))
            flats.append(torch.cat(parts))
        with crc32(self.io.crc32):
            torch_save(make(flats), sink, sink.name)
        return 0

    def obj(self, job, file: str, tensors: dict) -> dict:
        layout = job.layout
        m = _DIR_RE.match(file.split("/")[0])
        pp = parse_dirname(tuple(int(x) if x else None for x in m.groups()), layout.pp)[1]
        common = job.common
        obj = {k: common[k] for k in ("args", "checkpoint_version", "iteration", "reshard")}
        opt = job.optimizer
        if opt and opt["sharding"] == optim.NON_DISTRIBUTED:
            obj["optimizer"] = non_distributed_entry(
                dict(opt, group_sizes=self.group_sizes[pp]), {n: t for n, t in tensors.items() if n.startswith("optimizer/")})
        elif "optimizer" in common:
            obj["optimizer"] = common["optimizer"]
        if "opt_param_scheduler" in common:
            obj["opt_param_scheduler"] = common["opt_param_scheduler"]
        grouped = bool(common["reshard"]["layout"].get("moe_grouped_gemm"))
        for v, mkey in enumerate(model_keys(layout)):
            model = {}
            for name, t in tensors.items():
                if name.startswith(mkey + "/"):
                    model[name[len(mkey) + 1:]] = t
            for name in extra_state_names(job.spec, layout, self.ctx.table, pp, v, grouped):
                model[name] = None
            obj[mkey] = model
        return obj

    def finish(self, job, stage: str) -> None:
        mg.write_tracker(stage, job.iteration)
