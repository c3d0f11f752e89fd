"""Live resharding: move a running job's weights from one layout to another in memory, shard to shard.

The file converter's planner and exchange (:func:`reshard.plan.build_plan`,
:func:`reshard.exchange.exchange_rounds`) with live state dicts in place of files: every local tensor
of every rank is described by the canonical (HF) rectangles it holds, exactly as a Megatron file's
tensors are, so the plan lists the overlapping rectangles between the two layouts and each moves
once, from one rank that holds it to every rank that needs it::

    from reshard import api

    spec = api.model_spec("tiny_llama3")              # a preset, an HF config dict or Megatron args
    trainer = api.Layout(tp=2, pp=2, naming="megatron", impl="local", dtype=torch.bfloat16)
    engine = api.Layout(tp=4, naming="hf_tp", fused=True, dtype=torch.bfloat16)
    plan = api.plan(spec, trainer, engine)             # pure: the same on every rank, cache it
    out = api.reshard(plan, model.state_dict(), out=engine_params)   # collective over the group

Namings (FORMATS.md §9): ``megatron`` - the names and local shapes of Megatron-core's
``GPTModel.state_dict()`` on each rank (TE or local spec, stage-local layer numbers; with a virtual
pipeline a list of one state dict per model chunk); ``hf`` - full HF tensors on every rank of the
layout; ``hf_tp`` - HF names, each TP rank holding the slice vLLM's loaders cut (q/k/v by heads, kv heads
replicated when there are fewer than TP ranks, gate/up by rows, o/down by columns, vocab rows padded to a
multiple of ``vocab_pad`` and split evenly, the padding zero), optionally ``fused`` as vLLM names them
(``qkv_proj``, ``gate_up_proj``, experts ``w13_weight`` ``[E, 2f/tp, h]`` and ``w2_weight`` ``[E, h, f/tp]``).

Ranks are numbered within the process group; a layout's ranks are its Megatron order by default (tp
fastest, then dp, then pp; experts: etp fastest, then ep, inside the tp*dp ranks of a stage). The
source and target layouts may share ranks (colocated) or not (a trainer and an engine in one group).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import dist as rdist
from .errors import ConfigError, LayoutError
from .exchange import exchange_rounds
from .formats import megatron as mg
from .formats import megatron_legacy as legacy
from .layout import Layout as ParallelLayout
from .mapping import MappingTable
from .models import table_for
from .plan import Plan as PiecePlan
from .plan import build_plan
from .spec import ModelSpec, spec_from_hf_config
from .types import Piece, Placement, Shape, SourceIndex, SourceSlice, StoredTensor, TargetTensor

NAMINGS = ("megatron", "hf", "hf_tp")
State = Union[Mapping[str, torch.Tensor], Sequence[Mapping[str, torch.Tensor]]]


@dataclass(frozen=True)
class Layout:
    """How one side holds the model: parallel sizes, the ranks (of the process group) in their
    Megatron order, the naming of the tensors, and their dtype."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    etp: Optional[int] = None
    dp: int = 1
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    ranks: Optional[Tuple[int, ...]] = None
    naming: str = "megatron"
    impl: str = "transformer_engine"  # megatron naming: Transformer Engine or "local" spec names
    grouped: bool = False  # megatron naming: TE grouped-GEMM expert names (linear_fc1.weight{j})
    fused: bool = False  # hf_tp naming: vLLM's fused qkv_proj / gate_up_proj / experts w13, w2
    dtype: torch.dtype = torch.bfloat16
    make_vocab_size_divisible_by: int = 128  # megatron naming: vocab padding, times tp
    vocab_pad: int = 64  # hf_tp naming: vLLM's VocabParallelEmbedding padding

    @property
    def size(self) -> int:
        """Ranks the layout spans."""
        if self.naming == "megatron":
            return self.tp * self.pp * self.dp
        return self.dp * (self.tp if self.naming == "hf_tp" else 1)

    @property
    def group_ranks(self) -> Tuple[int, ...]:
        return tuple(self.ranks) if self.ranks is not None else tuple(range(self.size))

    def parallel(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, vpp=self.vpp, ep=self.ep, etp=self.etp,
                              first_stage_layers=self.first_stage_layers, last_stage_layers=self.last_stage_layers,
                              make_vocab_size_divisible_by=self.make_vocab_size_divisible_by)

    def describe(self) -> str:
        parts = [self.naming, f"tp={self.tp}"]
        parts += [f"{k}={getattr(self, k)}" for k in ("pp", "vpp", "ep", "etp", "dp")
                  if getattr(self, k) not in (None, 1)]
        return " ".join(parts) + f" on ranks {list(self.group_ranks)}"


@dataclass(frozen=True)
class Slot:
    """One local tensor of one rank: its name (``model{v}/`` before it in a virtual-pipeline chunk
    ``v``), local shape, the canonical rectangles it holds, and (hf_tp vocab) the first padding row."""

    name: str
    shape: Shape
    placements: Tuple[Placement, ...]
    pad_from: Optional[int] = None


def model_spec(x: Any) -> ModelSpec:
    """A :class:`ModelSpec` from a preset name, an HF ``config.json`` dict, Megatron ``args`` (a
    Namespace) or a spec."""
    if isinstance(x, ModelSpec):
        return x
    if isinstance(x, str):
        from .synthetic import load_preset

        return load_preset(x)
    if isinstance(x, Mapping):
        return spec_from_hf_config(x, "the config dict")
    return mg.spec_from_args(x, "the Megatron args")


# ---------------------------------------------------------------------------- what each rank holds

def _coords(lay: Layout, pos: int) -> Tuple[int, int, int, int]:
    """``(tp rank, expert-tp rank, ep rank, pp rank)`` of position ``pos`` in a megatron layout."""
    tp, dp = lay.tp, lay.dp
    stage = pos % (tp * dp)
    etp = lay.etp or tp
    return pos % tp, stage % etp, (stage // etp) % lay.ep, pos // (tp * dp)


def _megatron_slots(spec: ModelSpec, lay: Layout, table: MappingTable, pos: int, reading: bool) -> List[Slot]:
    el = lay.parallel()
    t, et, ep, pp = _coords(lay, pos)
    out = []
    for v in range(el.vp):
        pre = f"model{v}/" if el.vp > 1 else ""
        for e, i, name in legacy.rank_items(spec, el, table, pp, v, ep, lay.impl, lay.grouped, tied_copy=not reading):
            pls = mg.local_placements(e, spec, el, et if e.expert is not None else t, i, reading=reading)
            out.append(Slot(pre + name, mg.local_shape(e, spec, el), tuple(pls)))
    return out


def _full(name: str, shape: Shape) -> Placement:
    return Placement(name, (0,) * len(shape), tuple(shape), (0,) * len(shape))


def _hf_slots(spec: ModelSpec, table: MappingTable) -> List[Slot]:
    return [Slot(name, e.part_shape(spec, role), (_full(name, e.part_shape(spec, role)),))
            for name, (e, role, _) in table.canonical_names(spec).items()]


def _tp_rows(e, role: str, spec: ModelSpec, lay: Layout, t: int, rows: int) -> Tuple[int, int]:
    """``(first row, rows)`` of canonical part ``role`` that vLLM's TP rank ``t`` holds (dim-0 rules)."""
    tp = lay.tp
    if e.tp_rule == "qkv" and role in ("k", "v") and spec.num_query_groups < tp:
        hd = rows // spec.num_query_groups
        return t // (tp // spec.num_query_groups) * hd, hd  # one kv head, replicated over tp/ng ranks
    if e.tp_rule in ("qkv", "gated", "column"):
        return t * (rows // tp), rows // tp
    return 0, rows


def _hf_tp_part(e, role: str, name: str, spec: ModelSpec, lay: Layout, t: int) -> Slot:
    """Rank ``t``'s slice of one canonical tensor, unfused."""
    shape = e.part_shape(spec, role)
    if e.tp_rule == "vocab":
        per = -(-shape[0] // lay.vocab_pad) * lay.vocab_pad // lay.tp
        a, b = t * per, min((t + 1) * per, shape[0])
        pls = (Placement(name, (a, 0), (b - a, shape[1]), (0, 0)),) if b > a else ()
        return Slot(name, (per, shape[1]), pls, pad_from=max(0, b - a))
    if e.tp_rule == "row":
        c = shape[1] // lay.tp
        return Slot(name, (shape[0], c) + shape[2:], (Placement(name, (0, t * c) + (0,) * len(shape[2:]),
                                                                (shape[0], c) + shape[2:], (0,) * len(shape)),))
    r0, n = _tp_rows(e, role, spec, lay, t, shape[0])
    rest = tuple(shape[1:])
    return Slot(name, (n,) + rest, (Placement(name, (r0,) + (0,) * len(rest), (n,) + rest, (0,) * len(shape)),))


_EXPERT = re.compile(r"\.experts\.\d+\.")


def _fused_name(e, parts: Dict[str, str]) -> str:
    """vLLM's name of a fused parameter."""
    first = next(iter(parts.values()))
    if e.expert is not None:
        return _EXPERT.split(first)[0] + (".experts.w13_weight" if e.tp_rule == "gated" else ".experts.w2_weight")
    if e.tp_rule == "qkv":
        return first.replace("q_proj", "qkv_proj")
    return first.replace("gate_proj", "gate_up_proj")


def _moved(p: Placement, dst_off: Shape) -> Placement:
    """``p`` landing at ``dst_off`` (a plain constructor: dataclasses.replace costs 30 us a call, and a large
    MoE plan makes a million of these)."""
    return Placement(p.canonical, p.c_off, p.c_size, dst_off, p.repeat)


def _hf_tp_slots(spec: ModelSpec, lay: Layout, table: MappingTable, t: int) -> List[Slot]:
    out: List[Slot] = []
    stacked: Dict[str, List[Slot]] = {}  # fused experts: per-expert slots stacked on a leading axis
    for e, i in table.entries(spec):
        parts = {role: tmpl.format(i=i) if i is not None else tmpl for role, tmpl in e.parts().items()}
        slots = [_hf_tp_part(e, role, name, spec, lay, t) for role, name in parts.items()]
        fuse = lay.fused and (e.tp_rule in ("qkv", "gated") or e.expert is not None)
        if not fuse:
            out.extend(slots)
            continue
        rows, pls = 0, []
        for s in slots:  # rows one after another: [q; k; v], [gate; up]
            pls += [_moved(p, (rows + p.dst_off[0],) + p.dst_off[1:]) for p in s.placements]
            rows += s.shape[0]
        fused = Slot(_fused_name(e, parts), (rows,) + slots[0].shape[1:], tuple(pls))
        if e.expert is None:
            out.append(fused)
        else:
            stacked.setdefault(fused.name, []).append(fused)
    for name, per_expert in stacked.items():
        pls = tuple(_moved(p, (k,) + p.dst_off) for k, s in enumerate(per_expert)
                    for p in s.placements)
        out.append(Slot(name, (len(per_expert),) + per_expert[0].shape, pls))
    return out


def rank_slots(spec: ModelSpec, lay: Layout, table: MappingTable, pos: int, reading: bool = False) -> List[Slot]:
    """The local tensors of the rank at position ``pos`` of ``lay`` (``reading``: as a source, whose
    padding rows and tied copies are not read)."""
    if lay.naming == "megatron":
        return _megatron_slots(spec, lay, table, pos, reading)
    if lay.naming == "hf":
        return _hf_slots(spec, table)
    return _hf_tp_slots(spec, lay, table, pos % lay.tp)


def _ignored_source_names(spec: ModelSpec, lay: Layout, name: str) -> bool:
    """Names a Megatron state dict holds that are not read: ``_extra_state`` and a tied output layer's copy."""
    if lay.naming != "megatron":
        return False
    base = name.split("/", 1)[-1]
    return base.endswith("_extra_state") or (base == "output_layer.weight" and spec.tie_word_embeddings)


# ------------------------------------------------------------------------------------- the plan

def _check_layout(spec: ModelSpec, lay: Layout, side: str) -> None:
    problems = []
    if lay.naming not in NAMINGS:
        problems.append(f"naming={lay.naming!r} is not one of {NAMINGS}")
    elif lay.naming == "megatron":
        problems += lay.parallel().problems(spec)
        if lay.dp < 1:
            problems.append(f"dp={lay.dp} must be >= 1")
        elif spec.is_moe and (lay.tp * lay.dp) % ((lay.etp or lay.tp) * lay.ep):
            problems.append(f"tp*dp={lay.tp * lay.dp} ranks per stage do not hold etp*ep="
                            f"{(lay.etp or lay.tp) * lay.ep} expert ranks (Megatron carves ep out of dp)")
        if lay.impl not in ("transformer_engine", "local"):
            problems.append(f"impl={lay.impl!r} must be 'transformer_engine' or 'local'")
    else:
        if lay.naming == "hf" and lay.tp != 1:
            problems.append("naming=hf holds full tensors: tp must be 1 (use naming=hf_tp for TP slices)")
        if lay.pp != 1 or lay.ep != 1 or lay.vpp not in (None, 1) or lay.etp not in (None, lay.tp):
            problems.append(f"naming={lay.naming} holds whole layers on every rank: pp, vpp, ep and etp must be 1")
        if lay.naming == "hf_tp" and spec.is_encoder:
            problems.append(f"{spec.model_type} has no Hugging Face / vLLM spelling (Megatron's BertModel is "
                            "pre-LayerNorm, HF's post-LayerNorm): use naming=megatron, or hf for full tensors "
                            "under Megatron's TP=1 names")
        elif lay.naming == "hf_tp":
            problems += _hf_tp_problems(spec, lay)
    if lay.ranks is not None and (len(lay.ranks) != lay.size or len(set(lay.ranks)) != len(lay.ranks)):
        problems.append(f"ranks={list(lay.ranks)} must be {lay.size} distinct ranks (the layout's size)")
    if problems:
        raise LayoutError(f"the {side} layout ({lay.describe()}) does not fit {spec.name or spec.model_type}:\n  - "
                          + "\n  - ".join(problems))


def _hf_tp_problems(spec: ModelSpec, lay: Layout) -> List[str]:
    tp, ng, out = lay.tp, spec.num_query_groups, []
    if spec.num_attention_heads % tp:
        out.append(f"num_attention_heads={spec.num_attention_heads} is not divisible by tp={tp}")
    if ng % tp and tp % ng:
        out.append(f"num_key_value_heads={ng} must divide tp={tp} or be a multiple of it")
    for what, n in (("intermediate_size", 0 if spec.is_moe and not spec.dense_layers else spec.ffn_hidden_size),
                    ("moe_intermediate_size", spec.expert_ffn if spec.is_moe else 0),
                    ("shared_expert_intermediate_size", spec.shared_expert_ffn_hidden_size)):
        if n % tp:
            out.append(f"{what}={n} is not divisible by tp={tp}")
    padded = -(-spec.vocab_size // lay.vocab_pad) * lay.vocab_pad
    if padded % tp:
        out.append(f"the vocab padded to {padded} (a multiple of vocab_pad={lay.vocab_pad}) is not divisible by tp={tp}")
    return out


def _dtype_rule(default: torch.dtype, dtypes: Mapping[str, torch.dtype]):
    def of(name: str) -> torch.dtype:
        return next((d for pat, d in dtypes.items() if fnmatch.fnmatchcase(name, pat)), default)
    return of


def _groups(slots_of: Dict[int, List[Slot]]) -> Tuple[List[Slot], List[List[int]]]:
    """Identical local tensors of several ranks (data-parallel replicas, TP-replicated norms) as one:
    the distinct slots, round-robin over the ranks so that consecutive ones belong to different ranks,
    and the ranks holding each."""
    ids: Dict[Tuple[str, Shape, Tuple[Placement, ...]], int] = {}
    slots: List[Slot] = []
    holders: List[List[int]] = []
    ranks = sorted(slots_of)
    for j in range(max((len(v) for v in slots_of.values()), default=0)):
        for r in ranks:
            if j < len(slots_of[r]):
                s = slots_of[r][j]
                k = (s.name, s.shape, s.placements)
                if k not in ids:
                    ids[k] = len(slots)
                    slots.append(s)
                    holders.append([])
                holders[ids[k]].append(r)
    return slots, holders


class Plan:
    """What moves where between two layouts of one model: pure, the same on every rank. Build it
    once with :func:`plan` and reuse it for every refresh; the schedule for a bucket size is cached."""

    def __init__(self, spec: ModelSpec, src: Layout, dst: Layout, dtypes: Optional[Mapping[str, torch.dtype]] = None):
        for lay, side in ((src, "source"), (dst, "target")):
            _check_layout(spec, lay, side)
        self.spec, self.src, self.dst, self.dtypes = spec, src, dst, dict(dtypes or {})
        self.table = table_for(spec)
        self.world = max(src.group_ranks + dst.group_ranks) + 1
        self.src_slots = {r: rank_slots(spec, src, self.table, k, reading=True) for k, r in enumerate(src.group_ranks)}
        self.dst_slots = {r: rank_slots(spec, dst, self.table, k) for k, r in enumerate(dst.group_ranks)}
        self.src_dtype = _dtype_rule(src.dtype, self.dtypes)
        self.dst_dtype = _dtype_rule(dst.dtype, self.dtypes)
        self.index, self._holders = self._source_index()
        self.targets, self._writers = self._target_tensors()
        self._schedules: Dict[int, PiecePlan] = {}
        self._full: Dict[Tuple[int, ...], "Plan"] = {}

    def _source_index(self) -> Tuple[SourceIndex, Dict[str, Tuple[int, ...]]]:
        from .verify import covered_volume

        names = self.table.canonical_names(self.spec)
        shapes = {n: e.part_shape(self.spec, role) for n, (e, role, _) in names.items()}
        slices: Dict[str, List[SourceSlice]] = defaultdict(list)
        holders = {}
        slots, ranks = _groups(self.src_slots)
        for g, (s, who) in enumerate(zip(slots, ranks)):
            dtypes = {self.src_dtype(p.canonical) for p in s.placements} or {self.src.dtype}
            st = StoredTensor(f"src{g}", s.name, s.shape, dtypes.pop())
            holders[st.file] = tuple(who)
            for p in s.placements:
                slices[p.canonical].append(SourceSlice(st, p.c_off, p.dst_off, p.c_size))
        for n, shape in shapes.items():  # each canonical element held once (replicas are merged above)
            got = covered_volume(sorted((sl.c_off, sl.size) for sl in slices[n]))
            if got != math.prod(shape) or sum(math.prod(sl.size) for sl in slices[n]) != got:
                raise LayoutError(f"the source layout ({self.src.describe()}) holds {got} of the {math.prod(shape)} "
                                  f"elements of {n} (or some twice under different names)")
        index = SourceIndex("live", "", self.spec, shapes, {n: self.src_dtype(n) for n in shapes}, dict(slices))
        return index, holders

    def _target_tensors(self) -> Tuple[List[TargetTensor], Dict[str, Tuple[int, ...]]]:
        slots, ranks = _groups(self.dst_slots)
        out, writers = [], {}
        for g, (s, who) in enumerate(zip(slots, ranks)):
            dts = {self.dst_dtype(p.canonical) for p in s.placements} or {self.dst.dtype}
            if len(dts) != 1:
                raise ConfigError(f"{s.name} would hold canonical tensors of several dtypes {sorted(map(str, dts))}")
            out.append(TargetTensor(f"dst{g}", s.shape, dts.pop(), list(s.placements), name=s.name))
            writers[f"dst{g}"] = tuple(who)
        return out, writers

    def schedule(self, bucket_bytes: int) -> PiecePlan:
        """The pieces, their senders and receivers, in rounds that move at most ``bucket_bytes`` per rank."""
        if bucket_bytes not in self._schedules:
            self._schedules[bucket_bytes] = build_plan(
                self.index, self.targets, self.world, buffer_bytes=bucket_bytes,
                max_piece_bytes=max(1 << 16, bucket_bytes // 2),
                writers_of=lambda p, t: self._writers[t.key], readers_of=lambda p: self._holders[p.stored.file])
        return self._schedules[bucket_bytes]

    def full(self, ranks: Tuple[int, ...]) -> "Plan":
        """The plan from this one's source to full HF tensors on ``ranks`` (:func:`iter_full`)."""
        if ranks not in self._full:
            lay = Layout(naming="hf", dp=len(ranks), ranks=ranks, dtype=self.dst.dtype)
            self._full[ranks] = Plan(self.spec, self.src, lay, self.dtypes)
        return self._full[ranks]

    def rank_bytes(self, bucket_bytes: int = 256 << 20) -> List[Dict[str, int]]:
        """Per rank of the group: bytes it sends, receives and copies locally."""
        stats = [dict(send=0, recv=0, local=0) for _ in range(self.world)]
        for p in self.schedule(bucket_bytes).pieces:
            for w in p.writers:
                if w == p.reader:
                    stats[w]["local"] += p.out_nbytes
                else:
                    stats[p.reader]["send"] += p.out_nbytes
                    stats[w]["recv"] += p.out_nbytes
        return stats

    # -------------------------------------------------------------- the state dicts of one rank

    def _flatten(self, state: Optional[State], lay: Layout, what: str) -> Dict[str, Any]:
        if state is None:
            return {}
        vp = (lay.vpp or 1) if lay.naming == "megatron" else 1
        if vp > 1:
            if isinstance(state, Mapping) or len(state) != vp:
                raise ConfigError(f"the {what} of a virtual pipeline (vpp={vp}) is a list of {vp} state dicts, "
                                  "one per model chunk")
            return {f"model{v}/{k}": t for v, chunk in enumerate(state) for k, t in chunk.items()}
        if not isinstance(state, Mapping):
            raise ConfigError(f"the {what} must be a dict of tensors (got {type(state).__name__})")
        return dict(state)

    def check_source(self, rank: int, state: Optional[State]) -> Dict[str, torch.Tensor]:
        """This rank's source tensors by internal name; raises naming every mismatch."""
        if rank not in self.src_slots:
            return {}
        flat = self._flatten(state, self.src, "source state")
        shapes = {s.name: s.shape for s in self.src_slots[rank]}
        dtypes = {s.name: self._slot_dtype(s, self.src_dtype, self.src.dtype) for s in self.src_slots[rank]}
        extra = [k for k in flat if k not in shapes and not _ignored_source_names(self.spec, self.src, k)]
        self._raise_mismatch(rank, "source state", flat, shapes, dtypes, extra)
        return {k: flat[k] for k in shapes}

    def prepare_out(self, rank: int, flat: Optional[Dict[str, Any]], device: torch.device) -> Dict[str, torch.Tensor]:
        """This rank's target tensors by internal name: those of ``flat`` (``out`` flattened; checked) or new
        ones; padding rows zeroed."""
        if rank not in self.dst_slots:
            return {}
        slots = self.dst_slots[rank]
        shapes = {s.name: s.shape for s in slots}
        dtypes = {s.name: self._slot_dtype(s, self.dst_dtype, self.dst.dtype) for s in slots}
        if flat is None:
            flat = {s.name: torch.empty(s.shape, dtype=dtypes[s.name], device=device) for s in slots}
        else:
            extra = [k for k in flat if k not in shapes and not k.endswith("_extra_state")]
            self._raise_mismatch(rank, "out state", flat, shapes, dtypes, extra)
        for s in slots:
            if s.pad_from is not None:
                flat[s.name][s.pad_from:].zero_()
        return {k: flat[k] for k in shapes}

    @staticmethod
    def _slot_dtype(s: Slot, rule, default) -> torch.dtype:
        return rule(s.placements[0].canonical) if s.placements else default

    def _raise_mismatch(self, rank, what, flat, shapes, dtypes, extra) -> None:
        problems = [f"missing {k} {tuple(shapes[k])}" for k in shapes if k not in flat]
        problems += [f"unexpected {k}" for k in extra]
        for k, shape in shapes.items():
            t = flat.get(k)
            if k not in flat:
                continue
            if not isinstance(t, torch.Tensor):
                problems.append(f"{k} is a {type(t).__name__}, not a tensor")
            elif tuple(t.shape) != tuple(shape) or t.dtype != dtypes[k]:
                problems.append(f"{k} is {tuple(t.shape)} {t.dtype}, the plan has {tuple(shape)} {dtypes[k]}")
        if problems:
            lay = self.src if what == "source state" else self.dst
            raise ConfigError(f"rank {rank}: the {what} does not match the plan ({lay.describe()}); "
                              f"{len(problems)} problem(s): " + "; ".join(problems[:12])
                              + (f"; ... (+{len(problems) - 12} more)" if len(problems) > 12 else ""))

    def result(self, rank: int, flat: Dict[str, torch.Tensor]) -> State:
        """The target state of this rank as the naming has it (megatron: with its ``_extra_state`` entries,
        a list of chunks under a virtual pipeline)."""
        if self.dst.naming != "megatron":
            return flat
        el = self.dst.parallel()
        pp = _coords(self.dst, self.dst.group_ranks.index(rank))[3]
        chunks = []
        for v in range(el.vp):
            pre = f"model{v}/" if el.vp > 1 else ""
            d = {k[len(pre):]: t for k, t in flat.items() if k.startswith(pre)}
            d.update((n, None) for n in legacy.extra_state_names(self.spec, el, self.table, pp, v, self.dst.grouped))
            chunks.append(d)
        return chunks if el.vp > 1 else chunks[0]


def plan(spec: Any, src: Layout, dst: Layout, dtypes: Optional[Mapping[str, torch.dtype]] = None) -> Plan:
    """The plan from ``src`` to ``dst``. ``spec``: see :func:`model_spec`. ``dtypes``: canonical-name
    patterns (fnmatch) held in another dtype than the layouts' on both sides, e.g.
    ``{"*.e_score_correction_bias": torch.float32}``."""
    return Plan(model_spec(spec), src, dst, dtypes)


# --------------------------------------------------------------------------------- moving bytes

def _rect(t: torch.Tensor, off: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    return t[tuple(slice(o, o + s) for o, s in zip(off, size))]


def _device(tensors, group) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _prepare(pl: Plan, src_state, out, group, full: bool = False):
    me = rdist.rank(group)
    err, src, dst, device = None, {}, {}, torch.device("cpu")
    try:
        if rdist.world(group) < pl.world:
            raise LayoutError(f"the plan spans ranks 0..{pl.world - 1}; the process group has {rdist.world(group)}")
        src = pl.check_source(me, src_state)
        flat_out = pl._flatten(out, pl.dst, "out state") if out is not None and me in pl.dst_slots else None
        device = _device(list(src.values()) + list((flat_out or {}).values()), group)
        if not full:
            dst = pl.prepare_out(me, flat_out, device)
    except Exception as e:  # every rank hears of it before any byte moves
        err = e
    rdist.agree(err, "checking the state dicts against the plan", group=group)
    return me, src, dst, device


def _counters(stats: Optional[Dict[str, float]]) -> Dict[str, float]:
    counters = stats if stats is not None else {}
    for k in ("bytes_sent", "bytes_received", "bytes_local"):
        counters.setdefault(k, 0)
    return counters


def _reader(src: Dict[str, torch.Tensor]):
    def read(p: Piece) -> torch.Tensor:
        t = _rect(src[p.stored.key], p.s_off, p.s_size).reshape(p.size)
        return t.to(p.dtype)
    return read


def _put(dst: torch.Tensor, p: Piece, t: torch.Tensor) -> None:
    if p.repeat > 1:  # Megatron's vocab padding: one row broadcast
        t = t.expand(p.repeat, *t.shape[1:])
    _rect(dst, p.dst_off, p.dst_size).copy_(t.reshape(p.dst_size))


def reshard(plan: Plan, src_state: Optional[State], out: Optional[State] = None, group=None,
            bucket_mb: float = 256, stats: Optional[Dict[str, float]] = None) -> Optional[State]:
    """Collective over ``group`` (default: every rank): each source rank sends only what some target rank
    needs, each target rank receives exactly its shard - into ``out``'s tensors in place when given (an
    engine's live parameters; the same storage afterwards), else into new tensors. At most ``bucket_mb``
    MiB move per rank per round; tensors are cast to the target dtype by their sender. Returns this rank's
    target state (None on ranks outside the target layout). A state dict that does not match the plan
    raises on every rank, naming its tensors, before any byte moves. ``stats`` receives bytes_sent,
    bytes_received, bytes_local and rounds."""
    me, src, dst, device = _prepare(plan, src_state, out, group)
    sched = plan.schedule(int(bucket_mb * 2**20))
    counters = _counters(stats)
    read, by_key = _reader(src), {t.key: t.name for t in plan.targets}
    for p in sched.pieces:
        if p.round < 0 and p.reader == me:  # held here and needed only here
            _put(dst[by_key[p.key]], p, read(p))
            counters["bytes_local"] += p.out_nbytes
    for arrived in exchange_rounds(sched, me, read, device, counters, group):
        for p, t in arrived:
            _put(dst[by_key[p.key]], p, t)
            counters["bytes_local"] += p.out_nbytes if p.reader == me else 0
    counters["rounds"] = sched.num_rounds
    if me not in plan.dst_slots:
        return None
    return out if out is not None else plan.result(me, dst)


def iter_full(plan: Plan, src_state: Optional[State], ranks: Sequence[int] = (0,), group=None,
              bucket_mb: float = 256, stats: Optional[Dict[str, float]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """For engines that take only full tensors (``model.load_weights(iterable)``): yields ``(hf_name, tensor)``
    on ``ranks``, in HF order, bucketed: each piece is sent once to each receiving rank (no all-gather onto
    every rank) and a tensor is yielded as soon as all of it has arrived. Collective: every rank of the
    group must exhaust the iterator (ranks outside ``ranks`` yield nothing)."""
    full = plan.full(tuple(ranks))
    me, src, _, device = _prepare(full, src_state, None, group, full=True)
    sched = full.schedule(int(bucket_mb * 2**20))
    counters = _counters(stats)
    read = _reader(src)
    targets = {t.key: t for t in full.targets}
    need = defaultdict(int)  # pieces still to arrive here, per target
    local = defaultdict(list)  # round -> pieces held here and needed only here
    last = 0
    for p in sched.pieces:
        last = p.round if p.round >= 0 else last
        if me in p.writers:
            need[p.key] += 1
            if p.round < 0:
                local[last].append(p)
    building: Dict[str, torch.Tensor] = {}
    order = [t.key for t in full.targets if t.key in need]
    done = 0

    def put(p, t):
        if p.key not in building:
            tt = targets[p.key]
            building[p.key] = torch.empty(tt.shape, dtype=tt.dtype, device=device)
        _put(building[p.key], p, t)
        need[p.key] -= 1

    rounds = exchange_rounds(sched, me, read, device, counters, group)
    for rnd in range(max(sched.num_rounds, 1)):
        arrived = next(rounds, [])
        for p in local.get(rnd, ()):
            put(p, read(p))
            counters["bytes_local"] += p.out_nbytes
        for p, t in arrived:
            put(p, t)
            counters["bytes_local"] += p.out_nbytes if p.reader == me else 0
        while done < len(order) and need[order[done]] == 0:
            key = order[done]
            yield targets[key].name, building.pop(key)
            done += 1
    for _ in rounds:  # no rounds remain; finishes the generator
        pass
    counters["rounds"] = sched.num_rounds
