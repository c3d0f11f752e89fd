"""Megatron-core's distributed optimizer in bucket space (FORMATS.md §8): where each parameter's
master weight and Adam moments lie in the flat fp32 buffers of one model-parallel rank, and the
slices that decode them into canonical shadow tensors (reshard/optim.py).

Both bucket-space forms share the layout: torch_dist ``dp_reshardable`` (one 1-D tensor per
bucket, ``optimizer.distributed.dp_group_idx_{mp rank}.gbuf_idx_{g}.dtype_{(p, g)}.bucket_idx_{b}.<kind>``,
sized to the bucket's unpadded numel) and legacy ``distrib_optim.pt`` (one tensor per buffer, the
buckets' unpadded contents end to end). Megatron's rules (``DistributedOptimizer._compute_per_buffer_param_layout``):

- the parameters of a model chunk, in ``named_parameters()`` order, are laid out **in reverse**;
- each parameter starts at a multiple of 64 elements, counted from the bucket's start (buckets start
  at multiples of ``lcm(dp, 128)``, so the rule holds within a bucket whatever the DP size);
- a bucket closes once it holds ``bucket_size`` elements; a ``shared_embedding`` parameter (the
  word embedding of the first stage and the tied output copy of the last, with PP > 1) has a bucket
  of its own; the bucket end's padding to ``lcm(dp, 128)`` is not saved.

So a bucket's content is fixed by its parameters and its unpadded size: ``dp_reshardable`` records
each bucket's size (the tensor's global shape), from which the parameters of each bucket follow;
``distrib_optim.pt`` records only the buffer's total, and the bucket boundaries come from the
args the run trained with (:func:`bucket_size`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .. import optim
from ..errors import SourceError
from ..layout import Layout
from ..mapping import MappingTable
from ..spec import ModelSpec
from ..types import Placement, SourceSlice, StoredTensor

ALIGN = 64  # parameter starts, in elements (param_layout.pad_param_start)
KINDS = ("param", "exp_avg", "exp_avg_sq")  # what a bucket holds per parameter (the master weight, Adam's moments)

# registration order of Megatron-core's modules, as named_parameters() walks them: GPTModel / BertModel,
# TransformerLayer, SelfAttention (linear_proj is built in Attention.__init__, before linear_qkv), the MLP
# and MoE layers. Names not listed sort after the listed ones of their level, then by name.
_ORDER = {n: i for i, n in enumerate((
    "embedding", "word_embeddings", "position_embeddings", "tokentype_embeddings",
    "decoder", "encoder", "layers", "input_layernorm", "self_attention", "linear_proj", "linear_qkv",
    "q_layernorm", "k_layernorm", "pre_mlp_layernorm", "mlp", "router", "experts", "local_experts",
    "shared_experts", "linear_fc1", "linear_fc2", "gate_weight", "final_layernorm", "pooler", "dense", "lm_head",
    "layer_norm", "output_layer", "binary_head",
    # inside one module: Transformer Engine's fused norm is registered before the GEMM's weight
    "layer_norm_weight", "layer_norm_bias", "weight", "bias"))}


def _order_key(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, _ORDER.get(p, len(_ORDER)), p) for p in name.split("."))


def named_parameters_order(names: Sequence[str]) -> List[str]:
    """``names`` (one model chunk's parameters) in Megatron-core's ``named_parameters()`` order."""
    return sorted(names, key=_order_key)


@dataclass(frozen=True)
class Param:
    """One parameter of a model chunk: its mapping entry, global layer, Megatron name (stage-local), local shape."""

    entry: object
    layer: Optional[int]
    name: str
    shape: Tuple[int, ...]
    shared_embedding: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class BufferLayout:
    """One buffer: ``ranges[name] = (bucket, start, end)`` with start/end relative to the bucket's start;
    ``unpadded[b]``: the elements bucket ``b`` holds (what is saved)."""

    params: List[Param]
    ranges: Dict[str, Tuple[int, int, int]]
    unpadded: List[int]

    def bucket_params(self, b: int) -> List[Param]:
        return [p for p in self.params if self.ranges[p.name][0] == b]

    def coalesced_start(self, b: int) -> int:
        """Where bucket ``b`` starts in ``distrib_optim.pt``'s buffer (the buckets' unpadded contents end to end)."""
        return sum(self.unpadded[:b])


def layout_buffer(params: List[Param], bucket_size: Optional[int] = None,
                  bucket_sizes: Optional[List[int]] = None, where: str = "") -> BufferLayout:
    """Megatron's layout of ``params`` (``named_parameters()`` order) in one buffer: buckets close at
    ``bucket_size`` elements (None: one bucket), or - decoding a checkpoint that records them - exactly
    at the ``bucket_sizes`` it records (a mismatch is an error: the parameters are not what it holds)."""
    ranges: Dict[str, Tuple[int, int, int]] = {}
    unpadded: List[int] = []
    start, b, used = 0, 0, []  # start: relative to the bucket

    def close(end: int):
        nonlocal start, b, used
        unpadded.append(end)
        start, b, used = 0, b + 1, []

    for p in reversed(params):
        start = -(-start // ALIGN) * ALIGN
        if p.shared_embedding and used:  # the shared embedding opens a bucket of its own
            close(start)
        end = start + p.numel
        ranges[p.name] = (b, start, end)
        used.append(p)
        if bucket_sizes is not None:
            full = b < len(bucket_sizes) and end >= bucket_sizes[b]
        else:
            full = bucket_size is not None and end >= bucket_size
        if full or p.shared_embedding:
            close(end)
        else:
            start = end
    if used:
        close(end)
    if bucket_sizes is not None and unpadded != list(bucket_sizes):
        raise SourceError(f"{where}: the distributed optimizer's buckets hold {list(bucket_sizes)} elements; "
                          f"the model's parameters in Megatron's order lay out as {unpadded} (is the checkpoint's "
                          "architecture or layout not what its args say?)")
    return BufferLayout(list(params), ranges, unpadded)


def bucket_size(args, dp: int, pp_rank: int, chunk: int) -> Optional[int]:
    """The bucket size a Megatron-LM run used for one model chunk (``DistributedDataParallel.__init__``):
    ``--ddp-bucket-size`` or ``max(4e7, 1e6 * dp)``; one bucket (None) without ``--overlap-grad-reduce``,
    on pipeline stages after the first, and for the model chunks after the first (Megatron-LM's
    ``disable_bucketing``)."""
    if not getattr(args, "overlap_grad_reduce", False) or pp_rank > 0 or chunk > 0:
        return None
    if getattr(args, "overlap_param_gather_with_optimizer_step", False):
        return None
    size = getattr(args, "ddp_bucket_size", None)
    return int(size) if size is not None else max(40000000, 1000000 * dp)


def run_dp_size(args, layout: Layout) -> Optional[int]:
    """The data-parallel size a run trained with: its args' ``data_parallel_size``, else ``world_size`` over
    TP x PP x CP; None when the args record neither."""
    from . import megatron as mg

    dp = mg._get(args, "data_parallel_size")
    if dp is None and mg._get(args, "world_size") is not None:
        cp = int(mg._get(args, "context_parallel_size", default=1) or 1)
        dp = int(mg._get(args, "world_size")) // (layout.tp * layout.pp * cp)
    return dp


def chunk_params(spec: ModelSpec, layout: Layout, table: MappingTable, pp: int, v: int, impl: str,
                 vocab_rows: Optional[int] = None) -> List[Param]:
    """The parameters of model chunk ``v`` of pipeline stage ``pp`` (any TP rank: they have the same
    shapes), in ``named_parameters()`` order, with the ``shared_embedding`` flags Megatron sets
    (``LanguageModule.setup_embeddings_and_output_layer``: tied embeddings only). ``vocab_rows``: the padded vocab as stored."""
    from . import megatron as mg
    from .megatron_legacy import rank_items

    items = rank_items(spec, layout, table, pp, v, 0, impl)
    first = pp == 0 and v == 0
    last = pp == layout.pp - 1 and v == layout.vp - 1
    out = []
    for e, i, name in items:
        # only a tied embedding (Megatron returns early otherwise; MTP, which also sets it, is not converted)
        shared = layout.pp > 1 and spec.tie_word_embeddings and (
            (first and not last and name == "embedding.word_embeddings.weight") or
            (last and not first and name == "output_layer.weight"))
        shape = mg.local_shape(e, spec, layout)
        if e.tp_rule == "vocab":
            shape = ((vocab_rows or layout.padded_vocab(spec.vocab_size)) // layout.tp,) + shape[1:]
        out.append(Param(e, i, name, shape, shared))
    by_name = {p.name: p for p in out}
    return [by_name[n] for n in named_parameters_order(list(by_name))]


_DP_KEY = re.compile(r"^optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\.dtype_(.+)\.bucket_idx_(\d+)\.(\w+)$")


def parse_dp_key(key: str):
    """``(mp rank, gbuf, dtype text, bucket, kind)`` of a ``dp_reshardable`` bucket key, else None."""
    m = _DP_KEY.match(key)
    return None if m is None else (int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5))


def mp_coords(i: int, layout: Layout) -> Tuple[int, int]:
    """``(tp rank, pp rank)`` of rank ``i`` of Megatron's model-parallel group (TP fastest)."""
    return i % layout.tp, i // layout.tp


def boxes(shape: Tuple[int, ...], lo: int, hi: int):
    """Elements ``[lo, hi)`` of a C-order tensor of ``shape`` as boxes ``(origin, size, first element)``:
    each a contiguous block of whole trailing rows, so that it is a tensor of its own in the file."""
    if lo >= hi:
        return []
    if len(shape) == 0:
        return [((), (), lo)]
    inner = math.prod(shape[1:])
    r0, r1, a = lo // inner, hi // inner, -(-lo // inner)  # rows wholly inside: [a, r1)
    out = []
    if lo % inner:  # a partial first row
        end = min(hi, (r0 + 1) * inner)
        for o, s, f in boxes(shape[1:], lo - r0 * inner, end - r0 * inner):
            out.append(((r0,) + o, (1,) + s, r0 * inner + f))
    if r1 > a:
        out.append(((a,) + (0,) * (len(shape) - 1), (r1 - a,) + tuple(shape[1:]), a * inner))
    if hi % inner and r1 >= a:  # a partial last row (not the first row's own)
        for o, s, f in boxes(shape[1:], 0, hi - r1 * inner):
            out.append(((r1,) + o, (1,) + s, r1 * inner + f))
    return out


def param_slices(param: Param, placements: List[Placement], spans, canonical_of) -> List[Tuple[str, SourceSlice]]:
    """The canonical slices of one parameter's local tensor, stored in pieces: ``spans`` =
    ``[(lo, hi, file, byte offset of element lo, dtype, key)]`` cover its flat elements ``[lo, hi)``.
    ``canonical_of(placement)``: the shadow name the placement's canonical rectangle goes to."""
    out = []
    for lo, hi, file, offset, dtype, key in spans:
        for origin, size, first in boxes(param.shape, lo, hi):
            st = StoredTensor(file, f"{key}[{first}:{first + math.prod(size)}]", tuple(size), dtype,
                              offset + (first - lo) * dtype.itemsize)
            for pl in placements:
                a = tuple(max(p, o) for p, o in zip(pl.dst_off, origin))
                b = tuple(min(p + n, o + s) for p, n, o, s in zip(pl.dst_off, pl.c_size, origin, size))
                if any(y <= x for x, y in zip(a, b)):
                    continue
                c_off = tuple(c + (x - d) for c, x, d in zip(pl.c_off, a, pl.dst_off))
                out.append((canonical_of(pl), SourceSlice(st, c_off, tuple(x - o for x, o in zip(a, origin)),
                                                          tuple(y - x for x, y in zip(a, b)))))
    return out


def read_placements(p: Param, spec: ModelSpec, layout: Layout, t: int, vocab_rows: Optional[int]):
    """The canonical rectangles TP rank ``t``'s local tensor of ``p`` holds (vocab padding rows left out), or
    None when its state is not read from this rank: a replicated parameter is read from TP rank 0, the tied
    output copy of the last stage (equal to the embedding's) not at all."""
    from . import megatron as mg

    if (p.entry.tp_rule == "replicated" and t != 0) or (spec.tie_word_embeddings and p.name == "output_layer.weight"):
        return None
    rows = vocab_rows if p.entry.tp_rule == "vocab" else None
    return mg.local_placements(p.entry, spec, layout, t, p.layer, reading=True, rows=rows)


def shadow_slices(spec: ModelSpec, layout: Layout, t: int, buf: BufferLayout, kinds, spans_of,
                  vocab_rows: Optional[int], out: Dict[str, List[SourceSlice]]) -> None:
    """Add the shadow slices of TP rank ``t``'s buffer ``buf`` to ``out``. ``spans_of(kind, bucket, lo, hi)``:
    where elements ``[lo, hi)`` of a bucket are stored, as ``[(lo, hi, file, byte offset of lo, dtype, key)]``
    (which parameters are read here: :func:`read_placements`)."""
    for p in buf.params:
        pls = read_placements(p, spec, layout, t, vocab_rows)
        if pls is None:
            continue
        b, s, e = buf.ranges[p.name]
        for kind in kinds:
            spans = [(lo - s, hi - s, f, off, dt, key) for lo, hi, f, off, dt, key in spans_of(kind, b, s, e)]
            if sum(hi - lo for lo, hi, *_ in spans) != p.numel:
                raise SourceError(f"{p.name} (bucket {b}, elements {s}..{e}) is not wholly stored in the {kind} bucket")
            for name, sl in param_slices(p, pls, spans, lambda pl, k=kind: optim.shadow(k, pl.canonical)):
                out.setdefault(name, []).append(sl)


def check_decodable(spec: ModelSpec, layout: Optional[Layout], where: str) -> None:
    """Bucket-space state is decoded where Megatron-core's parameter order is known (FORMATS.md §8)."""
    if layout is None:
        raise SourceError(f"{where}: no args in the checkpoint, so the layout its optimizer buckets follow is unknown")
    why = ("a mixture of experts (its expert parameters are in the expert optimizer's own buffers)" if spec.is_moe else
           "multi-latent attention" if spec.mla else "a BertModel" if spec.is_encoder else None)
    if why:
        raise SourceError(f"{where}: the bucket-space optimizer state of {why} is not decoded in this version "
                          "(the parameter order in its buffers is not verified); re-save with "
                          "--dist-ckpt-optim-fully-reshardable, whose model-space state is read")


def decode_buckets(spec: ModelSpec, table: MappingTable, layout: Optional[Layout], buckets: Dict[tuple, Dict[str, tuple]],
                   impl: str, vocab_rows: Optional[int], chunk_records, chunk_tensor, where: str
                   ) -> Dict[str, List[SourceSlice]]:
    """torch_dist ``dp_reshardable``: ``buckets[(mp rank, gbuf, bucket)][kind] = (key, metadata)``.
    ``chunk_records([(key, metadata)])`` and ``chunk_tensor(key, chunk, records)`` find each chunk's bytes."""
    check_decodable(spec, layout, where)
    mp = {i for i, _, _ in buckets}
    if mp != set(range(layout.tp * layout.pp)):
        raise SourceError(f"{where}: optimizer buckets for model-parallel ranks {sorted(mp)}; the layout "
                          f"(TP={layout.tp} PP={layout.pp}) has {layout.tp * layout.pp}")
    kinds = sorted({k for b in buckets.values() for k in b})
    records = chunk_records([kv for b in buckets.values() for kv in b.values()])
    out: Dict[str, List[SourceSlice]] = {}
    for i in sorted(mp):
        t, pp = mp_coords(i, layout)
        gbufs = sorted({g for j, g, _ in buckets if j == i})
        if gbufs != list(range(layout.vp)):
            raise SourceError(f"{where}: model-parallel rank {i} has optimizer buffers {gbufs}; one per model chunk "
                              f"({layout.vp}) is decoded (a second dtype or expert buffer is not)")
        for g in gbufs:
            sizes, spans = [], {}
            for b in range(len({x for j, h, x in buckets if (j, h) == (i, g)})):
                have = buckets.get((i, g, b))
                if have is None or set(have) != set(kinds):
                    raise SourceError(f"{where}: model-parallel rank {i} buffer {g} bucket {b} lacks "
                                      f"{sorted(set(kinds) - set(have or ()))}")
                sizes.append(int(have[kinds[0]][1].size[0]))
                for kind, (key, meta) in have.items():
                    if tuple(meta.size) != (sizes[-1],):
                        raise SourceError(f"{where}: {key} has shape {tuple(meta.size)}, its bucket {sizes[-1]}")
                    spans[(kind, b)] = sorted(
                        (int(ch.offsets[0]), int(ch.sizes[0]), chunk_tensor(key, ch, records)) for ch in meta.chunks)
            buf = layout_buffer(chunk_params(spec, layout, table, pp, g, impl, vocab_rows), bucket_sizes=sizes,
                                where=f"{where} (model-parallel rank {i}, buffer {g})")

            def spans_of(kind, b, lo, hi, spans=spans):
                out_ = []
                for c0, n, st in spans[(kind, b)]:
                    a, z = max(lo, c0), min(hi, c0 + n)
                    if a < z:
                        out_.append((a, z, st.file, st.offset + (a - c0) * st.dtype.itemsize, st.dtype, st.key))
                return out_

            shadow_slices(spec, layout, t, buf, kinds, spans_of, vocab_rows, out)
    return out


def incomplete(spec: ModelSpec, table: MappingTable, slices: Dict[str, List[SourceSlice]], kinds) -> List[str]:
    """Shadows that do not cover their weight exactly once (decoded elements counted)."""
    out = []
    for name, (e, role, _) in sorted(table.canonical_names(spec).items()):
        n = math.prod(e.part_shape(spec, role))
        for kind in kinds:
            got = sum(math.prod(s.size) for s in slices.get(optim.shadow(kind, name), ()))
            if got != n:
                out.append(f"{kind} of {name}: {got} of {n} elements decoded")
    return out


def decode_dp_zero(spec: ModelSpec, table: MappingTable, layout: Layout, args, files: Dict[Tuple[int, int], tuple],
                   where: str) -> Dict[str, List[SourceSlice]]:
    """Legacy ``distrib_optim.pt``: ``files[(tp, pp)] = (path relative to the root, its parsed tree, its size)``,
    one per TP x PP rank (Megatron's DP rank 0 gathers it). The buckets' boundaries are not in the file: they
    follow from the args (:func:`bucket_size`), checked against each buffer's ``numel_unpadded``."""
    from . import megatron as mg

    check_decodable(spec, layout, where)
    impl = str(mg._get(args, "transformer_impl", default="transformer_engine"))
    vocab_rows = mg._get(args, "padded_vocab_size")
    dp = run_dp_size(args, layout)
    out: Dict[str, List[SourceSlice]] = {}
    kinds = None
    for (t, p), (rel, tree, size) in sorted(files.items()):
        here = f"{where}/{rel}"
        if not isinstance(tree, dict) or not tree.get("buckets_coalesced"):
            raise SourceError(f"{here}: not the coalesced distrib_optim.pt of Megatron-core >= 0.7 (the older "
                              "per-bucket form is not decoded; Megatron-LM's --ckpt-convert-update-legacy-dist-opt-format "
                              "rewrites it)")
        gbufs = sorted(k for k in tree if isinstance(k, int))
        if gbufs != list(range(layout.vp)):
            raise SourceError(f"{here}: buffers {gbufs}; one per model chunk ({layout.vp}) is decoded")
        for g in gbufs:
            by_dtype = tree[g]
            if not isinstance(by_dtype, dict) or len(by_dtype) != 1:
                raise SourceError(f"{here}: buffer {g} has {len(by_dtype) if isinstance(by_dtype, dict) else 0} dtype "
                                  "entries; one is decoded")
            state = next(iter(by_dtype.values()))
            n = state.get("numel_unpadded")
            tensors = {k: v for k, v in state.items() if k != "numel_unpadded"}
            kinds = kinds or sorted(tensors)
            if sorted(tensors) != kinds:
                raise SourceError(f"{here}: buffer {g} holds {sorted(tensors)}, other files {kinds}")
            for kind, ref in tensors.items():
                if getattr(ref, "shape", None) != (n,) or not ref.contiguous:
                    raise SourceError(f"{here}: {kind} of buffer {g} is not a contiguous [{n}] tensor")
                if ref.offset + n * ref.dtype.itemsize > size:
                    raise SourceError(f"{here} is truncated: {kind} of buffer {g} needs bytes up to "
                                      f"{ref.offset + n * ref.dtype.itemsize}, the file has {size}")
            bs = bucket_size(args, dp or 1, p, g)
            buf = layout_buffer(chunk_params(spec, layout, table, p, g, impl, vocab_rows), bucket_size=bs)
            if sum(buf.unpadded) != n:
                raise SourceError(f"{here}: buffer {g} holds {n} elements; the model's parameters in Megatron's order "
                                  f"lay out as {sum(buf.unpadded)} (buckets {buf.unpadded}, bucket size {bs} from the "
                                  "args' ddp_bucket_size / overlap_grad_reduce / data_parallel_size)")

            def spans_of(kind, b, lo, hi, tensors=tensors, buf=buf, rel=rel):
                ref = tensors[kind]
                first = buf.coalesced_start(b) + lo
                return [(lo, hi, rel, ref.offset + first * ref.dtype.itemsize, ref.dtype, f"{rel}/{kind}")]

            shadow_slices(spec, layout, t, buf, kinds, spans_of, vocab_rows, out)
    return out


def attach(index, info: dict, slices: Dict[str, List[SourceSlice]], kinds) -> dict:
    """Put decoded shadow slices into ``index`` (with their weights' shapes); ``info`` gains the kinds,
    the shadow count and the shadows that do not cover their weight (problems)."""
    from ..models import table_for

    for name, sl in slices.items():
        index.slices[name] = sl
        index.dtypes[name] = sl[0].stored.dtype
        index.shapes[name] = index.shapes[optim.split(name)[1]]
        for s in sl:
            if s.stored.file not in index.files:
                index.files[s.stored.file] = os.path.getsize(os.path.join(index.root, s.stored.file))
    info["kinds"] = sorted(kinds)
    info["tensors"] = len(slices)
    info["problems"] = info["problems"] + incomplete(index.spec, table_for(index.spec), slices, kinds)
    return info


def fully_reshardable_risk(spec: ModelSpec, table: MappingTable, layout: Optional[Layout], args) -> Optional[str]:
    """Whether Megatron-core's fully_reshardable save could have corrupted this run's state (FORMATS.md §8):
    before Megatron-LM 32a03b77 (PR #5077) it sliced the padding-stripped buffers with offsets that include the
    bucket-end padding, so every parameter after a padded bucket end was saved shifted. Only a run with more
    than one bucket in a buffer is exposed; the writer's version is not recorded, so this is a warning."""
    from . import megatron as mg

    if layout is None or args is None or spec.is_moe or spec.mla or spec.is_encoder:
        return None
    dp = run_dp_size(args, layout)
    impl = str(mg._get(args, "transformer_impl", default="transformer_engine"))
    div = math.lcm(int(dp or 1), 128)
    for pp in range(layout.pp):
        for v in range(layout.vp):
            buf = layout_buffer(chunk_params(spec, layout, table, pp, v, impl), bucket_size(args, dp or 1, pp, v))
            padded = [n for n in buf.unpadded[:-1] if n % div]
            if padded:
                return (f"the run's distributed optimizer had {len(buf.unpadded)} buckets in a buffer (stage {pp}), "
                        f"{len(padded)} of them padded at the end: megatron-core before Megatron-LM 32a03b77 "
                        "(PR #5077) saved fully_reshardable state shifted for every parameter after such a bucket "
                        "(it logged 'param range exceeds unpadded buffer'); if this checkpoint was written by such a "
                        "version, its optimizer state is corrupt - re-save it as dp_reshardable, which reshard reads")
    return None
