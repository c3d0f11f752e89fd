"""ModelSpec: the architecture of a checkpoint, independent of format and layout.

A spec comes from a preset in ``conf/model/`` or is detected from the source (HF
``config.json``; other formats add their own readers). When both exist they must agree:
:func:`check_preset` names every differing field at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from .errors import ConfigError, SourceError, UnsupportedError

log = logging.getLogger(__name__)

# HF model_type -> mapping-table family (see reshard/models/).
# Qwen3 is the Llama table with per-head q/k norms; Qwen3-MoE the Qwen2-MoE table without the
# shared expert (its entries apply only when the spec has one).
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
               "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen2_moe", "deepseek_v3": "deepseek_v3",
               "bert": "bert"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "bert": "BertForPreTraining"}
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
# Families with an RMSNorm over each head's query and key (``self_attn.q_norm`` / ``k_norm``, ``[head_dim]``,
# one norm shared by all heads) - Megatron-core's ``qk_layernorm=True``.
QK_NORM_TYPES = ("qwen3", "qwen3_moe")
# Encoder families: Megatron-core BertModel (block ``encoder``, LayerNorm with biases, GeLU MLP, learned
# absolute positions). Their canonical names are Megatron's own at TP=1 (FORMATS.md §10): no HF class
# computes what BertModel computes, so there is no HF spelling to convert through.
ENCODER_TYPES = ("bert",)

# Fields that change the weights or the maths: a preset that disagrees on one is an error.
STRUCTURAL_FIELDS = (
    "model_type", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
    "head_dim", "ffn_hidden_size", "vocab_size", "norm_eps", "rope_theta", "rope_scaling",
    "tie_word_embeddings", "qkv_bias", "num_experts", "moe_ffn_hidden_size", "num_experts_per_tok",
    "moe_norm_topk_prob", "shared_expert_ffn_hidden_size", "shared_expert_gate", "moe_expert_bias",
    "moe_router_score_function", "dense_layers", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_topk_scaling_factor", "num_tokentypes", "binary_head",
)
# Fields that are carried through but do not change any tensor: a mismatch is a warning.
INFORMATIONAL_FIELDS = ("max_position_embeddings", "sliding_window", "dtype", "mtp_layers")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers. Linear weights are ``[out, in]``; ``head_dim`` is Megatron's kv_channels."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Mapping[str, Any]] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: Optional[int] = None
    dtype: str = "bfloat16"
    # mixture of experts (0 experts: a dense model). Every layer is an MoE layer.
    num_experts: int = 0
    moe_ffn_hidden_size: Optional[int] = None  # expert ffn size (default: ffn_hidden_size)
    num_experts_per_tok: int = 0
    moe_norm_topk_prob: bool = True  # top-k probabilities renormalised (Mixtral) or not (Qwen2-MoE)
    shared_expert_ffn_hidden_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # sigmoid gate [1, h] on the shared expert's output
    moe_expert_bias: bool = False  # router expert bias [E] (aux-loss-free balancing)
    moe_router_score_function: str = "softmax"  # Megatron's; sigmoid (with expert bias) has no HF form here
    # layers of a mixture-of-experts model whose MLP is a dense SwiGLU of ffn_hidden_size (HF Qwen-MoE
    # mlp_only_layers / decoder_sparse_step, Megatron moe_layer_freq as a list); () = every layer MoE
    dense_layers: Tuple[int, ...] = ()
    # multi-latent attention (DeepSeek-V3; kv_lora_rank 0: none). head_dim = qk_nope + qk_rope there.
    q_lora_rank: Optional[int] = None  # None: q_proj straight from the hidden state (V2-Lite shape)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # group-limited routing (DeepSeek-V3: the top experts of the best topk_group of n_group groups),
    # and the factor on the routed experts' output (routed_scaling_factor)
    moe_router_num_groups: int = 0
    moe_router_group_topk: int = 0
    moe_router_topk_scaling_factor: float = 1.0
    mtp_layers: int = 0  # multi-token-prediction layers the model was trained with (not converted)
    # BERT: token-type (segment) embeddings [num_tokentypes, h] (Megatron: 2 with the binary head, else 0),
    # and the pooler + binary (next-sentence) head
    num_tokentypes: int = 0
    binary_head: bool = False
    name: Optional[str] = field(default=None, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def first_moe_layer(self) -> int:
        """The number of leading dense layers (DeepSeek's first_k_dense_replace)."""
        return next((i for i in range(self.num_layers) if self.is_moe_layer(i)), self.num_layers)

    @property
    def mixed_layers(self) -> bool:
        """Dense and MoE layers in one model: Megatron-core then keys torch_dist per layer."""
        return self.is_moe and bool(self.dense_layers)

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def family(self) -> str:
        return MODEL_TYPES[self.model_type]

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def is_encoder(self) -> bool:
        return self.model_type in ENCODER_TYPES

    @property
    def qk_norm(self) -> bool:
        return self.model_type in QK_NORM_TYPES

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV weight: ``(nh + 2*ng) * hd``."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model spec fields {unknown}; known fields: {sorted(names)}")
        missing = sorted(
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and d.get(f.name) is None
        )
        if missing:
            raise ConfigError(f"model spec is missing required fields {missing}")
        d = {k: v for k, v in d.items()
             if v is not None or k in ("rope_scaling", "sliding_window", "name", "moe_ffn_hidden_size", "q_lora_rank")}
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = _freeze(d["rope_scaling"])
        if d.get("dense_layers") is not None:
            d["dense_layers"] = tuple(sorted(int(i) for i in d["dense_layers"]))
        spec = cls(**d)
        spec.check()
        return spec

    def check(self) -> None:
        """Internal consistency of the numbers themselves."""
        problems = []
        if self.model_type not in MODEL_TYPES:
            raise UnsupportedError(
                f"architecture model_type={self.model_type!r} is not supported; supported: "
                f"{sorted(MODEL_TYPES)} (see reshard/models/README.md to add one)"
            )
        for f in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                  "head_dim", "ffn_hidden_size", "vocab_size"):
            if int(getattr(self, f)) <= 0:
                problems.append(f"{f}={getattr(self, f)} must be positive")
        if not problems and self.num_attention_heads % self.num_query_groups:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.model_type in MOE_TYPES and self.num_experts <= 0:
            problems.append(f"model_type={self.model_type} is a mixture of experts: num_experts must be positive")
        if self.num_experts and self.model_type not in MOE_TYPES:
            problems.append(f"num_experts={self.num_experts} but model_type={self.model_type} is a dense family "
                            f"(mixture-of-experts types: {list(MOE_TYPES)})")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.num_experts}")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if self.dense_layers and (not self.num_experts or bad or len(set(self.dense_layers)) == self.num_layers):
            problems.append(f"dense_layers={list(self.dense_layers)} must name some, not all, of the "
                            f"{self.num_layers} layers of a mixture-of-experts model")
        if self.model_type == "deepseek_v3":
            dims = (self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim)
            if min(dims) <= 0 or self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
                problems.append(f"deepseek_v3 uses multi-latent attention: kv_lora_rank, qk_nope_head_dim, "
                                f"qk_rope_head_dim, v_head_dim must be positive (got {dims}) and head_dim = "
                                f"qk_nope + qk_rope (got {self.head_dim})")
        elif self.kv_lora_rank:
            problems.append(f"kv_lora_rank={self.kv_lora_rank}: multi-latent attention is deepseek_v3's")
        if self.model_type == "qwen3_moe" and self.shared_expert_ffn_hidden_size:
            problems.append("qwen3_moe has no shared expert: shared_expert_ffn_hidden_size must be 0")
        if self.model_type == "qwen2_moe" and not (self.shared_expert_ffn_hidden_size and self.shared_expert_gate):
            problems.append("qwen2_moe has a gated shared expert: set shared_expert_ffn_hidden_size and "
                            "shared_expert_gate=true")
        if self.is_encoder:
            if self.num_query_groups != self.num_attention_heads or self.num_experts:
                problems.append(f"{self.model_type} has multi-head attention and no experts: num_query_groups must "
                                f"equal num_attention_heads ({self.num_attention_heads}), num_experts 0")
            if self.num_tokentypes < 0:
                problems.append(f"num_tokentypes={self.num_tokentypes} must be >= 0")
        elif self.num_tokentypes or self.binary_head:
            problems.append(f"num_tokentypes / binary_head are BERT's; model_type={self.model_type} has neither")
        if problems:
            raise ConfigError("inconsistent model spec: " + "; ".join(problems))


class _FrozenDict(dict):
    """A hashable dict, so that ModelSpec stays a frozen, comparable value."""

    def __hash__(self):  # pragma: no cover - trivial
        return hash(tuple(sorted(self.items())))


def _freeze(d: Mapping[str, Any]) -> _FrozenDict:
    return _FrozenDict({k: v for k, v in dict(d).items()})


def _rope_scaling_from_hf(rs: Optional[Mapping[str, Any]]) -> Optional[_FrozenDict]:
    if not rs:
        return None
    rs = dict(rs)
    if "type" in rs and "rope_type" not in rs:
        rs["rope_type"] = rs.pop("type")
    rs.pop("type", None)
    if rs.get("rope_type") == "default":
        # transformers >= 4.5x writes rope_parameters {"rope_type": "default", "rope_theta": ..}
        return None
    rs.pop("rope_theta", None)
    return _freeze(rs)


def spec_from_hf_config(cfg: Mapping[str, Any], where: str = "config.json") -> ModelSpec:
    """Read a ModelSpec from a Hugging Face ``config.json`` dictionary."""
    model_type = cfg.get("model_type")
    if model_type in ENCODER_TYPES:
        raise UnsupportedError(f"{where}: model_type={model_type!r}: a Hugging Face BERT is not converted to or from "
                               f"Megatron: {hf_problems(ModelSpec(model_type, 1, 1, 1, 1, 1, 1, 1))[0]}")
    if model_type not in MODEL_TYPES:
        archs = cfg.get("architectures")
        raise UnsupportedError(
            f"{where}: model_type={model_type!r} (architectures={archs}) is not supported; "
            f"supported model types: {sorted(MODEL_TYPES)}"
        )
    try:
        nh = int(cfg["num_attention_heads"])
        h = int(cfg["hidden_size"])
        rope_params = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params:
            rope_scaling = rope_params
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        extra = _moe_from_hf(cfg, model_type, where)
        spec = ModelSpec(
            model_type=model_type,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=h,
            num_attention_heads=nh,
            num_query_groups=int(cfg.get("num_key_value_heads") or nh),
            head_dim=int(extra.pop("head_dim", None) or cfg.get("head_dim") or h // nh),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if model_type.startswith("qwen") else 1e-5)),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling_from_hf(rope_scaling),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            dtype=str(dtype).replace("torch.", ""),
            **extra,
        )
    except KeyError as e:
        raise SourceError(f"{where}: required field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        bad = [f"{k}={v!r}" for k, v in cfg.items() if k in _HF_NUMBERS and not _is_number(v)]
        raise SourceError(f"{where}: {', '.join(bad) if bad else e}: expected a number; fix config.json "
                          "(it does not describe this checkpoint as written)") from None
    spec.check()
    return spec


_HF_NUMBERS = ("num_attention_heads", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size", "decoder_sparse_step")


def _qwen_dense_layers(cfg: Mapping[str, Any]) -> Tuple[int, ...]:
    """transformers' Qwen-MoE rule: layer i is sparse iff it is not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0."""
    step, only = int(cfg.get("decoder_sparse_step", 1) or 1), {int(i) for i in cfg.get("mlp_only_layers") or []}
    L = int(cfg["num_hidden_layers"])
    return tuple(i for i in range(L) if i in only or (i + 1) % step != 0)


def _is_number(v) -> bool:
    if v is None or isinstance(v, bool):
        return v is None
    if isinstance(v, (int, float)):
        return True
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _deepseek_from_hf(cfg: Mapping[str, Any]) -> dict:
    """DeepSeek-V3 (and Kimi-K2, Moonlight): multi-latent attention, group-limited sigmoid routing with
    a score-correction bias, shared experts, the first first_k_dense_replace layers dense. HF's
    ``head_dim`` there is the rope part only; ours is the q/k head (nope + rope)."""
    L, k = int(cfg["num_hidden_layers"]), int(cfg.get("first_k_dense_replace", 0) or 0)
    freq = int(cfg.get("moe_layer_freq", 1) or 1)
    moe_ffn, shared = int(cfg["moe_intermediate_size"]), int(cfg.get("n_shared_experts") or 0)
    nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
    q_lora = cfg.get("q_lora_rank")
    return dict(
        num_experts=int(cfg["n_routed_experts"]), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        moe_ffn_hidden_size=moe_ffn, moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        shared_expert_ffn_hidden_size=moe_ffn * shared,
        moe_expert_bias=cfg.get("topk_method", "noaux_tc") == "noaux_tc", moe_router_score_function="sigmoid",
        moe_router_num_groups=int(cfg.get("n_group") or 0), moe_router_group_topk=int(cfg.get("topk_group") or 0),
        moe_router_topk_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        dense_layers=tuple(i for i in range(L) if i < k or i % freq != 0),
        q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(cfg["v_head_dim"]), head_dim=nope + rope,
        mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
    )


def _moe_from_hf(cfg: Mapping[str, Any], model_type: str, where: str) -> dict:
    if model_type == "deepseek_v3":
        return _deepseek_from_hf(cfg)
    if model_type == "mixtral":
        return dict(num_experts=int(cfg["num_local_experts"]), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                    moe_ffn_hidden_size=int(cfg["intermediate_size"]), moe_norm_topk_prob=True)
    if model_type == "qwen3_moe":
        # Qwen's own configs say num_experts; transformers >= 5 writes num_local_experts
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        if experts is None:
            raise KeyError("num_experts")
        return dict(num_experts=int(experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                    moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
                    moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), dense_layers=_qwen_dense_layers(cfg))
    if model_type == "qwen2_moe":
        return dict(dense_layers=_qwen_dense_layers(cfg),num_experts=int(cfg["num_experts"]), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                    moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
                    moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                    shared_expert_ffn_hidden_size=int(cfg["shared_expert_intermediate_size"]),
                    shared_expert_gate=True)
    return {}


def load_hf_config(path: str) -> dict:
    """The ``config.json`` of the HF checkpoint at ``path``, as a dict."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SourceError(f"{cfg_path} not found: a Hugging Face checkpoint needs its config.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"{cfg_path} cannot be read as JSON: {e}") from None


def read_hf_config(path: str) -> ModelSpec:
    return spec_from_hf_config(load_hf_config(path), os.path.join(path, "config.json"))


def _values_differ(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) > 1e-12 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return True
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        a, b = dict(a or {}), dict(b or {})
        return a.keys() != b.keys() or any(_values_differ(a[k], b[k]) for k in a)
    return a != b


def check_preset(preset: ModelSpec, detected: ModelSpec, source: str) -> ModelSpec:
    """Return the detected spec if the preset agrees with it; else raise naming every field."""
    # learned absolute positions (BERT): the table's row count is structural there
    structural = STRUCTURAL_FIELDS + (("max_position_embeddings",) if detected.is_encoder else ())
    diffs = [
        f"{f}: preset {getattr(preset, f)!r}, checkpoint {getattr(detected, f)!r}"
        for f in structural if _values_differ(getattr(preset, f), getattr(detected, f))
    ]
    if diffs:
        raise ConfigError(
            f"model preset {preset.name!r} disagrees with the checkpoint at {source}:\n  "
            + "\n  ".join(diffs)
            + "\nPick the preset that matches the checkpoint, or drop +model=... to use the "
            "architecture detected from the source."
        )
    for f in INFORMATIONAL_FIELDS:
        if f not in structural and _values_differ(getattr(preset, f), getattr(detected, f)):
            log.warning("preset %s has %s=%r but the checkpoint says %r; keeping the checkpoint's",
                        preset.name, f, getattr(preset, f), getattr(detected, f))
    return dataclasses.replace(detected, name=preset.name)


def to_hf_config(spec: ModelSpec) -> dict:
    """A ``config.json`` for ``spec`` in the field names current transformers reads."""
    cfg = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": dict(spec.rope_scaling) if spec.rope_scaling else None,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": spec.dtype,
    }
    if spec.model_type in ("llama", "qwen3", "qwen3_moe"):
        cfg["attention_bias"] = spec.qkv_bias
        cfg["mlp_bias"] = False
    if spec.model_type in ("mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe"):
        cfg["sliding_window"] = spec.sliding_window
    if spec.model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        cfg["use_sliding_window"] = False
    if spec.is_moe:
        cfg["num_experts_per_tok"] = spec.num_experts_per_tok
        cfg["output_router_logits"] = False
    if spec.model_type == "mixtral":
        cfg["num_local_experts"] = spec.num_experts
        cfg["intermediate_size"] = spec.expert_ffn
    if spec.model_type == "qwen2_moe":
        cfg.update(num_experts=spec.num_experts, moe_intermediate_size=spec.expert_ffn,
                   shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size,
                   norm_topk_prob=spec.moe_norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=list(spec.dense_layers), qkv_bias=spec.qkv_bias)
    if spec.model_type == "deepseek_v3":
        cfg.update(head_dim=spec.qk_rope_head_dim, qk_head_dim=spec.head_dim, q_lora_rank=spec.q_lora_rank,
                   kv_lora_rank=spec.kv_lora_rank, qk_nope_head_dim=spec.qk_nope_head_dim,
                   qk_rope_head_dim=spec.qk_rope_head_dim, v_head_dim=spec.v_head_dim,
                   n_routed_experts=spec.num_experts, moe_intermediate_size=spec.expert_ffn,
                   n_shared_experts=spec.shared_expert_ffn_hidden_size // spec.expert_ffn,
                   norm_topk_prob=spec.moe_norm_topk_prob, n_group=spec.moe_router_num_groups or 1,
                   topk_group=spec.moe_router_group_topk or 1, routed_scaling_factor=spec.moe_router_topk_scaling_factor,
                   first_k_dense_replace=spec.first_moe_layer, moe_layer_freq=1, topk_method="noaux_tc",
                   rope_interleave=True, num_nextn_predict_layers=0, attention_bias=spec.qkv_bias)
    if spec.model_type == "qwen3_moe":
        cfg.update(num_experts=spec.num_experts, moe_intermediate_size=spec.expert_ffn,
                   norm_topk_prob=spec.moe_norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=list(spec.dense_layers))
    return cfg


def hf_problems(spec: ModelSpec) -> list:
    """What transformers' class for ``spec.model_type`` cannot represent (exporting would lose it)."""
    out = []
    if spec.is_encoder:
        return ["Megatron-core's BertModel is pre-LayerNorm (x + Attn(LN(x)); megatron-core 0.19.2 defines "
                "apply_residual_connection_post_layernorm but never reads it) and HF BertForPreTraining is "
                "post-LayerNorm: no mapping of the weights gives HF's logits, so a Megatron BERT is converted "
                "between Megatron formats only (megatron_legacy, torch_dist, fsdp_dtensor)"]
    if spec.model_type == "mixtral":
        if spec.dense_layers:
            out.append("Mixtral has no dense layers")
        if spec.shared_expert_ffn_hidden_size:
            out.append("Mixtral has no shared expert")
        if spec.qkv_bias:
            out.append("Mixtral has no q/k/v biases")
        if not spec.moe_norm_topk_prob:
            out.append("Mixtral always renormalises the top-k router probabilities")
    if spec.model_type == "qwen3_moe" and spec.shared_expert_ffn_hidden_size:
        out.append("Qwen3-MoE has no shared expert")
    if spec.model_type == "deepseek_v3":
        if spec.dense_layers != tuple(range(spec.first_moe_layer)):
            out.append(f"DeepSeek-V3's dense layers are its first first_k_dense_replace; these are {spec.dense_layers}")
        if spec.shared_expert_gate or spec.shared_expert_ffn_hidden_size % spec.expert_ffn:
            out.append("DeepSeek-V3's shared experts are ungated multiples of moe_intermediate_size")
        if not spec.moe_expert_bias or spec.moe_router_score_function != "sigmoid":
            out.append("DeepSeek-V3 routes with sigmoid scores and a score-correction bias")
        return out
    if spec.moe_expert_bias:
        out.append(f"{spec.architecture} has no router expert bias")
    if spec.is_moe and spec.moe_router_score_function != "softmax":
        out.append(f"{spec.architecture} routes with softmax, the checkpoint with "
                   f"{spec.moe_router_score_function}")
    return out
