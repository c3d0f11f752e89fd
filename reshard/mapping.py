"""Mapping-table entries: canonical (HF) tensors <-> Megatron tensors, with the split rule
written in each entry (STYLE.md "Name mappings are tables").

An entry names the canonical tensor(s) it consumes (``{i}`` = layer index), the Megatron
name (Transformer-Engine spelling, plus the local-spec spelling where it differs, relative to
``decoder.layers.{i}.``, the table's ``layer_prefix``, for layer entries), and how the Megatron
tensor is made of the canonical ones (:class:`~reshard.transforms.Segment` lists along dim 0) and
split over TP.

Mixture-of-experts entries are written once with an ``{e}`` (global expert) placeholder in
their canonical names and ``{j}`` (expert index local to an expert-parallel rank) in their
Megatron names; :meth:`MappingTable.for_spec` expands them into one entry per expert, so
every expert is planned, moved and verified like any other tensor - no fused expert stack.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple

from .layout import Layout
from .spec import ModelSpec
from .transforms import Segment, gated_segments, qkv_segments, vocab_segments

# Symbolic dimensions used in entry shapes, resolved against a spec.
@functools.lru_cache(maxsize=64)
def dims(spec: ModelSpec) -> Dict[str, int]:
    return {
        "hidden": spec.hidden_size,
        "ffn": spec.ffn_hidden_size,
        "vocab": spec.vocab_size,
        "q_rows": spec.num_attention_heads * spec.head_dim,
        "kv_rows": spec.num_query_groups * spec.head_dim,
        "head_dim": spec.head_dim,
        # multi-latent attention
        "q_lora": spec.q_lora_rank or 0,
        "kv_lora": spec.kv_lora_rank,
        "kv_down": spec.kv_lora_rank + spec.qk_rope_head_dim,  # [c_kv; k_rope] rows of kv_a_proj_with_mqa
        "q_up": spec.num_attention_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim),
        "kv_up": spec.num_attention_heads * (spec.qk_nope_head_dim + spec.v_head_dim),
        "v_rows": spec.num_attention_heads * spec.v_head_dim,
        "experts": spec.num_experts,
        "moe_ffn": spec.expert_ffn,
        "shared_ffn": spec.shared_expert_ffn_hidden_size,
        "qkv_rows": spec.qkv_rows,
        # BERT: learned absolute positions, token types, the binary head's two classes
        "positions": spec.max_position_embeddings,
        "tokentypes": spec.num_tokentypes,
        "two": 2,
        "one": 1,
    }


@dataclass(frozen=True)
class Entry:
    """One Megatron tensor and the canonical tensors it is made of."""

    mcore: str
    local: Optional[str] = None
    when: Optional[str] = None  # spec predicate: "qkv_bias", "untied"
    extra_state: Optional[str] = None  # module whose `_extra_state` Megatron checkpoints
    # torch_dist key (layer-relative) when it is not ``mcore``; other keys it is also written under
    dist: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    # experts: Megatron's TE grouped-GEMM name (``{j}`` = local expert), and the expert this
    # entry is for once expanded (None: not an expert tensor)
    grouped: Optional[str] = None
    expert: Optional[int] = None
    is_expert: bool = False
    # in a model mixing dense and MoE layers: "dense" or "moe" (the layers it exists in); None: every layer
    layers: Optional[str] = None
    # the TP rule of this tensor in a local-spec (transformer_impl=local) legacy file when it differs: MLA's
    # down-projections are TE "duplicated" linears (replicated) but local ColumnParallelLinears (split rows)
    local_tp_rule: Optional[str] = None

    tp_rule: ClassVar[str] = ""

    @property
    def dist_key(self) -> str:
        return self.dist or self.mcore

    def for_expert(self, e: int) -> "Entry":
        """This expert-template entry for global expert ``e`` (canonical names filled in)."""
        changes = {f.name: getattr(self, f.name).replace("{e}", str(e)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), str) and "{e}" in getattr(self, f.name)}
        return dataclasses.replace(self, expert=e, **changes)

    def under(self, impl: str) -> "Entry":
        """This entry with the TP rule it has in a legacy file written by ``impl``."""
        if impl != "local" or not self.local_tp_rule:
            return self
        cls = {"column": Column, "replicated": Replicated}[self.local_tp_rule]
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def megatron_name(self, local_expert: Optional[int] = None, grouped: bool = False,
                      impl: str = "transformer_engine") -> str:
        """The layer-relative name in a legacy file (``local_expert`` = index on its EP rank)."""
        if self.is_expert:
            tmpl = self.grouped if grouped and self.grouped else self.mcore
            return tmpl.format(j=local_expert)
        return self.local if (impl == "local" and self.local) else self.mcore

    def parts(self) -> Dict[str, str]:
        """Role -> canonical name template."""
        raise NotImplementedError

    def part_shape(self, spec: ModelSpec, role: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def segments(self, spec: ModelSpec, layout: Layout) -> List[Segment]:
        """Rows of the Megatron (logical, TP=1) tensor, role-tagged."""
        raise NotImplementedError

    def rows(self, spec: ModelSpec, layout: Layout) -> int:
        return sum(s.rows * s.repeat for s in self.segments(spec, layout))

    def shape(self, spec: ModelSpec, layout: Layout) -> Tuple[int, ...]:
        first = next(iter(self.parts()))
        return (self.rows(spec, layout),) + self.part_shape(spec, first)[1:]

    def applies(self, spec: ModelSpec, layer: Optional[int] = None) -> bool:
        """Does the spec have this tensor (at ``layer``; without one: at some layer)?"""
        if self.layers is not None:
            moe = self.layers == "moe"
            if layer is not None and spec.is_moe_layer(layer) != moe:
                return False
            if layer is None and not any(spec.is_moe_layer(i) == moe for i in range(spec.num_layers)):
                return False
        return self._when(spec)

    def _when(self, spec: ModelSpec) -> bool:
        if self.when is None:
            return True
        if self.when not in WHEN:
            raise AssertionError(f"unknown predicate {self.when}")
        return bool(WHEN[self.when](spec))


# ``Entry.when`` predicates: the spec property that switches an entry on
WHEN = {
    "qkv_bias": lambda s: s.qkv_bias,
    "untied": lambda s: not s.tie_word_embeddings,
    "qk_norm": lambda s: s.qk_norm,
    "q_lora": lambda s: s.q_lora_rank is not None,
    "no_q_lora": lambda s: s.q_lora_rank is None,
    "shared_expert": lambda s: s.shared_expert_ffn_hidden_size > 0,
    "shared_gate": lambda s: s.shared_expert_ffn_hidden_size > 0 and s.shared_expert_gate,
    "expert_bias": lambda s: s.moe_expert_bias,
    "tokentypes": lambda s: s.num_tokentypes > 0,
    "binary_head": lambda s: s.binary_head,
}


@dataclass(frozen=True)
class _Single(Entry):
    hf: str = ""
    dims: Tuple[str, ...] = ()

    def parts(self):
        return {"": self.hf}

    def part_shape(self, spec, role):
        d = dims(spec)
        return tuple(d[x] for x in self.dims)

    def segments(self, spec, layout):
        return [Segment("", 0, 0, self.part_shape(spec, "")[0])]


@dataclass(frozen=True)
class Replicated(_Single):
    """Same full tensor on every TP rank (norms)."""
    tp_rule: ClassVar[str] = "replicated"


@dataclass(frozen=True)
class Column(_Single):
    """Split on dim 0 (output features)."""
    tp_rule: ClassVar[str] = "column"


@dataclass(frozen=True)
class Row(_Single):
    """Split on dim 1 (input features)."""
    tp_rule: ClassVar[str] = "row"


@dataclass(frozen=True)
class Vocab(_Single):
    """Vocab-parallel on dim 0, padded for the layout by repeating the last real row."""
    tp_rule: ClassVar[str] = "vocab"
    dims: Tuple[str, ...] = ("vocab", "hidden")

    def segments(self, spec, layout):
        return vocab_segments(spec.vocab_size, layout.padded_vocab(spec.vocab_size))


@dataclass(frozen=True)
class QKV(Entry):
    """Fused QKV grouped by kv head; TP takes plain row chunks of the fused tensor."""
    tp_rule: ClassVar[str] = "qkv"
    q: str = ""
    k: str = ""
    v: str = ""
    bias: bool = False

    def parts(self):
        return {"q": self.q, "k": self.k, "v": self.v}

    def part_shape(self, spec, role):
        d = dims(spec)
        rows = d["q_rows"] if role == "q" else d["kv_rows"]
        return (rows,) if self.bias else (rows, d["hidden"])

    def segments(self, spec, layout):
        return qkv_segments(spec.num_attention_heads, spec.num_query_groups, spec.head_dim)


@dataclass(frozen=True)
class GatedMLP(Entry):
    """SwiGLU fc1 ``[gate; up]``; TP rank r holds ``[gate_r; up_r]``."""
    tp_rule: ClassVar[str] = "gated"
    gate: str = ""
    up: str = ""
    ffn: str = "ffn"  # which ffn size (dims key): ffn, moe_ffn, shared_ffn

    def parts(self):
        return {"gate": self.gate, "up": self.up}

    def part_shape(self, spec, role):
        return (dims(spec)[self.ffn], spec.hidden_size)

    def segments(self, spec, layout):
        return gated_segments(dims(spec)[self.ffn])


@dataclass(frozen=True)
class MappingTable:
    """All entries of one architecture family."""

    family: str
    top: Tuple[Entry, ...]
    layer: Tuple[Entry, ...]
    dropped: Tuple[str, ...] = ()  # canonical names ignored on purpose ({i} allowed)
    layer_prefix: str = "decoder.layers.{i}."  # Megatron's block: decoder (GPTModel) or encoder (BertModel)
    _dropped_re: Tuple[re.Pattern, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "_dropped_re", tuple(
            re.compile("^" + re.escape(d).replace(r"\{i\}", r"\d+") + "$") for d in self.dropped))

    def validate(self) -> None:
        """Placeholders where they belong, names unique (checked when the table is built)."""
        seen_hf, seen_mc = set(), set()
        for scope, entries in (("top", self.top), ("layer", self.layer)):
            for e in entries:
                for role, name in e.parts().items():
                    if e.is_expert != ("{e}" in name) and e.expert is None:
                        raise AssertionError(f"{self.family}: {name!r}: expert entries (and only they) name {{e}}")
                    count = name.count("{i}")
                    if count != (1 if scope == "layer" else 0):
                        raise AssertionError(f"{self.family}: {scope} entry {name!r} has {count} layer placeholders")
                    # a dense layer's and an MoE layer's tensor may share a canonical name (the pre-MLP norm)
                    if (name, e.layers) in seen_hf or (e.layers is None and any(n == name for n, _ in seen_hf)):
                        raise AssertionError(f"{self.family}: canonical name {name!r} mapped twice")
                    seen_hf.add((name, e.layers))
                for mc in {e.mcore, e.local} - {None}:
                    if "{i}" in mc:
                        raise AssertionError(f"{self.family}: Megatron name {mc!r} must be layer-relative")
                    if (scope, mc, e.layers) in seen_mc and mc != e.mcore:
                        raise AssertionError(f"{self.family}: Megatron name {mc!r} used twice")
                    seen_mc.add((scope, mc, e.layers))

    def for_spec(self, spec: ModelSpec) -> "MappingTable":
        """Expert templates expanded for ``spec.num_experts`` experts (the table itself when dense)."""
        if not any(e.is_expert for e in self.layer):
            return self
        layer = []
        for e in self.layer:
            layer.extend([e.for_expert(k) for k in range(spec.num_experts)] if e.is_expert else [e])
        return MappingTable(self.family, self.top, tuple(layer), self.dropped, self.layer_prefix)

    @property
    def stack_prefix(self) -> str:
        """``decoder.layers.``: the torch_dist key prefix of the stacked layer tensors."""
        return self.layer_prefix.split("{i}")[0]

    def layer_key(self, layer, name: str) -> str:
        """A model chunk's name of a layer tensor (``decoder.layers.<layer>.<name>``)."""
        return f"{self.stack_prefix}{layer}.{name}"

    def is_dropped(self, name: str) -> bool:
        return any(r.match(name) for r in self._dropped_re)

    def entries(self, spec: ModelSpec):
        """Yield ``(entry, layer_or_None)`` for every Megatron tensor of this spec."""
        for e in self.top:
            if e.applies(spec):
                yield e, None
        for i in range(spec.num_layers):
            for e in self.layer:
                if e.applies(spec, i):
                    yield e, i

    def canonical_names(self, spec: ModelSpec) -> Dict[str, Tuple[Entry, str, Optional[int]]]:
        """Every canonical tensor the spec has -> (entry, role, layer)."""
        out = {}
        for e, i in self.entries(spec):
            for role, tmpl in e.parts().items():
                out[tmpl.format(i=i) if i is not None else tmpl] = (e, role, i)
        return out
