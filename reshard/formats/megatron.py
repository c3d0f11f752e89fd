"""What the two Megatron formats share (FORMATS.md §3-§5): where the rows of each mapping
entry live on a tensor-parallel rank, and the architecture/layout recorded in ``args``.

A Megatron tensor is built from canonical rectangles by its entry's row *segments*
(:mod:`reshard.transforms`); TP then takes, per rule, a contiguous chunk of rows
(column, vocab, fused QKV), two chunks (SwiGLU fc1 ``[W_r; V_r]``), a chunk of columns
(row-parallel) or everything (replicated). :func:`local_placements` intersects the two:
which canonical rectangle lands where in one rank's local tensor. Writers use it to build
local tensors; readers use the same function backwards to find canonical tensors in files.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from ..errors import SourceError
from ..layout import Layout
from ..mapping import Entry
from ..types import Placement
from ..spec import ModelSpec
from ..transforms import Segment

log = logging.getLogger("reshard")


def tp_rows(entry: Entry, rows: int, tp: int, t: int) -> List[Tuple[int, int, int]]:
    """``(logical_start, n, local_start)`` row runs TP rank ``t`` holds (dim 0 rules)."""
    if entry.tp_rule in ("column", "vocab", "qkv"):
        n = rows // tp
        return [(t * n, n, 0)]
    if entry.tp_rule == "gated":
        f = rows // 2 // tp
        return [(t * f, f, 0), (rows // 2 + t * f, f, f)]
    return [(0, rows, 0)]  # replicated, row (split on dim 1)


def read_segments(entry: Entry, spec: ModelSpec, layout: Layout) -> List[Segment]:
    """Segments that carry real data: vocab padding rows are never read back."""
    if entry.tp_rule == "vocab":
        return [Segment("", 0, 0, spec.vocab_size)]
    assert all(s.repeat == 1 for s in entry.segments(spec, layout))
    return entry.segments(spec, layout)


def local_placements(entry: Entry, spec: ModelSpec, layout: Layout, t: int, layer: Optional[int],
                     lead: Tuple[int, ...] = (), reading: bool = False,
                     rows: Optional[int] = None) -> List[Placement]:
    """Canonical rectangles in TP rank ``t``'s local tensor of ``entry`` (``lead`` prefixes
    the destination offsets, e.g. a stacked layer index). ``rows`` overrides the logical row
    count (a source's padded vocab, as stored)."""
    layout = layout.for_entry(entry)
    segs = read_segments(entry, spec, layout) if reading else entry.segments(spec, layout)
    rows = rows if rows is not None else entry.rows(spec, layout)
    runs = tp_rows(entry, rows, layout.tp, t)
    out = []
    for seg in segs:
        name = entry.parts()[seg.part]
        name = name.format(i=layer) if layer is not None else name
        rest = entry.part_shape(spec, seg.part)[1:]
        col_off, col_size = (0,) * len(rest), tuple(rest)
        if entry.tp_rule == "row":
            c = rest[0] // layout.tp
            col_off, col_size = (t * c,) + col_off[1:], (c,) + tuple(rest[1:])
        seg_lo, seg_hi = seg.dst_row, seg.dst_row + seg.rows * seg.repeat
        for lo, n, local in runs:
            a, b = max(seg_lo, lo), min(seg_hi, lo + n)
            if a >= b:
                continue
            if seg.repeat > 1:  # one canonical row broadcast over rows [a, b)
                out.append(Placement(name, (seg.src_row,) + col_off, (1,) + col_size,
                                     lead + (local + a - lo,) + (0,) * len(rest), b - a))
            else:
                out.append(Placement(name, (seg.src_row + a - seg_lo,) + col_off, (b - a,) + col_size,
                                     lead + (local + a - lo,) + (0,) * len(rest)))
    return out


def local_shape(entry: Entry, spec: ModelSpec, layout: Layout) -> Tuple[int, ...]:
    layout = layout.for_entry(entry)
    shape = entry.shape(spec, layout)
    if entry.tp_rule in ("column", "vocab", "qkv", "gated"):
        return (shape[0] // layout.tp,) + shape[1:]
    if entry.tp_rule == "row":
        return (shape[0], shape[1] // layout.tp) + shape[2:]
    return shape


# ------------------------------------------------------------------- args <-> spec and layout

def _get(args: Any, *names, default=None):
    for n in names:
        v = args.get(n) if isinstance(args, dict) else getattr(args, n, None)
        if v is not None:
            return v
    return default


def spec_from_common(common: dict, where: str, vocab_size: Optional[int] = None,
                     keys: Optional[Dict[str, tuple]] = None) -> ModelSpec:
    """The architecture of a Megatron checkpoint: our own record when it has one (exact),
    else Megatron's ``args`` (accepting the spellings that drifted between versions) with the
    model's tensor names and shapes (``keys``), which tell a BertModel (``encoder.*``) from a GPTModel."""
    ours = common.get("reshard") if isinstance(common, dict) else None
    if isinstance(ours, dict) and isinstance(ours.get("spec"), dict):
        spec = ModelSpec.from_dict(ours["spec"])
        # more rows asked for: padding rows read as data (a training checkpoint's, reshard/run.py); the
        # stored rows bound it (checked against the tensors)
        return dataclasses.replace(spec, vocab_size=vocab_size) if vocab_size and vocab_size > spec.vocab_size else spec
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:
        raise SourceError(f"{where}: no 'args' in the checkpoint; cannot tell its architecture")
    return spec_from_args(args, where, vocab_size, keys)


def _need(args: Any, where: str):
    def need(*names):
        v = _get(args, *names)
        if v is None:
            raise SourceError(f"{where}: args lacks {names[0]!r}; cannot tell the architecture")
        return v
    return need


def _true_vocab(args: Any, where: str, vocab_size: Optional[int]) -> int:
    padded = _get(args, "padded_vocab_size")
    true_vocab = vocab_size or _get(args, "vocab_size")
    if true_vocab is None:
        raise SourceError(
            f"{where}: the checkpoint records only the padded vocab ({padded}); the true vocab size cannot be "
            "known from it. Pass model.vocab_size=<n> or a preset (+model=<name>) - reshard never guesses it")
    if padded is not None and int(true_vocab) > int(padded):
        raise SourceError(f"{where}: vocab_size={true_vocab} is larger than the padded vocab {padded} in args")
    return int(true_vocab)


def _dtype_name(args: Any) -> str:
    return "bfloat16" if _get(args, "bf16") else "float16" if _get(args, "fp16") else "float32"


def is_bert(keys: Optional[Dict[str, tuple]]) -> bool:
    """Megatron's args do not name the model class; a BertModel's block is ``encoder`` (GPT: ``decoder``)."""
    return bool(keys) and any(k.startswith("encoder.") for k in keys)


def bert_spec_from_args(args: Any, where: str, vocab_size: Optional[int], keys: Dict[str, tuple]) -> ModelSpec:
    """A Megatron BERT: sizes from args; the position table's rows, the token types and the binary head
    from the tensors themselves (args: ``max_position_embeddings``, ``bert_binary_head``)."""
    need = _need(args, where)
    norm, swiglu = str(_get(args, "normalization", default="LayerNorm")), bool(_get(args, "swiglu", default=False))
    if norm != "LayerNorm" or swiglu:
        raise SourceError(f"{where}: a BertModel checkpoint (encoder.* tensors) whose args say normalization={norm}, "
                          f"swiglu={swiglu}; Megatron BERT uses LayerNorm and a GeLU MLP")
    nh, h = int(need("num_attention_heads")), int(need("hidden_size"))
    if _get(args, "group_query_attention", default=False):
        raise SourceError(f"{where}: args say group_query_attention=True; Megatron BERT has multi-head attention")
    # the tensors tell, where the stage holding them is there (else, in a damaged checkpoint, the args)
    pos = keys.get("embedding.position_embeddings.weight")
    binary = bool(_get(args, "bert_binary_head", default=True))
    if "lm_head.dense.weight" in keys:
        binary = "binary_head.weight" in keys
    tokentypes = 2 if binary else 0  # Megatron-LM's pretrain_bert
    if "embedding.word_embeddings.weight" in keys:
        tokentypes = keys.get("embedding.tokentype_embeddings.weight", (0,))[0]
    d = dict(
        model_type="bert", num_layers=int(need("num_layers")), hidden_size=h, num_attention_heads=nh,
        num_query_groups=nh, head_dim=int(_get(args, "kv_channels") or h // nh),
        ffn_hidden_size=int(_get(args, "ffn_hidden_size") or 4 * h), vocab_size=_true_vocab(args, where, vocab_size),
        norm_eps=float(_get(args, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
        max_position_embeddings=int(pos[0]) if pos else int(_get(args, "max_position_embeddings", default=512)),
        tie_word_embeddings=not bool(_get(args, "untie_embeddings_and_output_weights", default=False)),
        num_tokentypes=int(tokentypes),
        binary_head=binary, dtype=_dtype_name(args),
    )
    log.info("%s: a Megatron BERT (encoder.* tensors); architecture from its args and tensor shapes", where)
    return ModelSpec.from_dict(d)


def spec_from_args(args: Any, where: str, vocab_size: Optional[int] = None,
                   keys: Optional[Dict[str, tuple]] = None) -> ModelSpec:
    if is_bert(keys):
        return bert_spec_from_args(args, where, vocab_size, keys)
    need = _need(args, where)
    nh = int(need("num_attention_heads"))
    h = int(need("hidden_size"))
    gqa = bool(_get(args, "group_query_attention", default=False))
    ng = int(_get(args, "num_query_groups") or nh) if gqa else nh
    norm = str(_get(args, "normalization", default="LayerNorm"))
    swiglu = bool(_get(args, "swiglu", default=False))
    if norm != "RMSNorm" or not swiglu:
        raise SourceError(f"{where}: args say normalization={norm}, swiglu={swiglu}; the supported families "
                          "(Llama, Mistral, Qwen2) use RMSNorm and SwiGLU")
    moe = _moe_from_args(args, where)
    if _get(args, "add_bias_linear", default=False) and not _get(args, "disable_bias_linear", default=False):
        raise SourceError(f"{where}: args say add_bias_linear=True; the supported families have no linear biases")
    true_vocab = _true_vocab(args, where, vocab_size)
    qkv_bias = bool(_get(args, "add_qkv_bias", default=False))
    rope_scaling = None
    if _get(args, "use_rope_scaling", default=False):
        rope_scaling = {"rope_type": "llama3", "factor": float(_get(args, "rope_scaling_factor", default=8.0)),
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
    dtype = _dtype_name(args)
    qk_norm = bool(_get(args, "qk_layernorm", default=False))
    mla = _mla_from_args(args) if _get(args, "multi_latent_attention", default=False) else {}
    if mla:
        model_type = "deepseek_v3"
        rope_scaling = mla.pop("rope_scaling")
    elif moe and qk_norm:
        if moe.get("shared_expert_ffn_hidden_size"):
            raise SourceError(f"{where}: args say qk_layernorm=True with a shared expert; no supported family has "
                              "both (Qwen3-MoE has q/k norms and no shared expert)")
        model_type = "qwen3_moe"
    elif moe:
        model_type = "qwen2_moe" if moe.get("shared_expert_ffn_hidden_size") else "mixtral"
    else:
        model_type = "qwen3" if qk_norm else "qwen2" if qkv_bias else "llama"
    d = dict(
        model_type=model_type,
        num_layers=int(need("num_layers")),
        hidden_size=h,
        num_attention_heads=nh,
        num_query_groups=ng,
        head_dim=mla.pop("head_dim", None) or int(_get(args, "kv_channels") or h // nh),
        ffn_hidden_size=int(_get(args, "ffn_hidden_size") or 4 * h),
        vocab_size=true_vocab,
        norm_eps=float(_get(args, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
        rope_theta=float(_get(args, "rotary_base", default=10000)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_get(args, "max_position_embeddings", "seq_length", default=4096)),
        tie_word_embeddings=not bool(_get(args, "untie_embeddings_and_output_weights", default=False)),
        qkv_bias=qkv_bias,
        dtype=dtype,
        **moe,
        **mla,
    )
    log.info("%s: architecture from Megatron args (model_type %s guessed from the tensors' shape rules; "
             "pass +model=<preset> to name it)", where, d["model_type"])
    return ModelSpec.from_dict(d)


def _moe_from_args(args: Any, where: str) -> Dict[str, Any]:
    E = _get(args, "num_experts")
    if not E:
        return {}
    dense = _dense_layers(_get(args, "moe_layer_freq", default=1), int(_get(args, "num_layers") or 0), where)
    shared = int(_get(args, "moe_shared_expert_intermediate_size", default=0) or 0)
    return dict(
        num_experts=int(E),
        moe_ffn_hidden_size=int(_get(args, "moe_ffn_hidden_size") or _get(args, "ffn_hidden_size")),
        num_experts_per_tok=int(_get(args, "moe_router_topk", default=2)),
        moe_norm_topk_prob=not bool(_get(args, "moe_router_pre_softmax", default=False)),
        shared_expert_ffn_hidden_size=shared,
        shared_expert_gate=bool(_get(args, "moe_shared_expert_gate", default=False)) and shared > 0,
        moe_expert_bias=bool(_get(args, "moe_router_enable_expert_bias", default=False)),
        moe_router_score_function=str(_get(args, "moe_router_score_function", default="softmax")),
        moe_router_num_groups=int(_get(args, "moe_router_num_groups") or 0),
        moe_router_group_topk=int(_get(args, "moe_router_group_topk") or 0),
        moe_router_topk_scaling_factor=float(_get(args, "moe_router_topk_scaling_factor") or 1.0),
        dense_layers=dense,
    )


def _mla_from_args(args: Any) -> Dict[str, Any]:
    nope, rope = int(_get(args, "qk_head_dim", default=128)), int(_get(args, "qk_pos_emb_head_dim", default=64))
    q_lora = _get(args, "q_lora_rank")
    rs = None
    if _get(args, "rope_type", default="yarn") == "yarn":
        rs = {"rope_type": "yarn", "factor": float(_get(args, "rotary_scaling_factor", default=40.0)),
              "mscale": float(_get(args, "mscale", default=1.0)),
              "mscale_all_dim": float(_get(args, "mscale_all_dim", default=0.0)),
              "original_max_position_embeddings": int(_get(args, "original_max_position_embeddings", default=4096)),
              "beta_fast": float(_get(args, "beta_fast", default=32)), "beta_slow": float(_get(args, "beta_slow", default=1))}
    return dict(q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=int(_get(args, "kv_lora_rank", default=512)),
                qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(_get(args, "v_head_dim", default=128)),
                head_dim=nope + rope, rope_scaling=rs)


def _dense_layers(freq: Any, L: int, where: str) -> tuple:
    """Megatron's ``moe_layer_freq``: an int k (every k-th layer is MoE, from layer 0) or a per-layer
    list of 1 (MoE) / 0 (dense); the command-line string form ``"([0]*3+[1]*29)"`` too."""
    if isinstance(freq, str):
        try:
            freq = int(freq) if freq.strip().isdigit() else _eval_list(ast.parse(freq.strip(), mode="eval").body)
        except (ValueError, SyntaxError):
            raise SourceError(f"{where}: moe_layer_freq={freq!r} is neither an integer nor a list of 0/1") from None
    if isinstance(freq, int):
        return tuple(i for i in range(L) if i % freq != 0)
    freq = [int(x) for x in freq]
    if len(freq) != L or set(freq) - {0, 1}:
        raise SourceError(f"{where}: moe_layer_freq={freq!r} must have one 0/1 per layer ({L} layers)")
    return tuple(i for i, f in enumerate(freq) if not f)


def _eval_list(node) -> list:
    """A list literal, or sums and products of list literals with ints (``[0]*3+[1]*29``)."""
    if isinstance(node, ast.List):
        return [int(ast.literal_eval(x)) for x in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _eval_list(node.left) + _eval_list(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        if isinstance(node.left, ast.List):
            return _eval_list(node.left) * int(ast.literal_eval(node.right))
        return _eval_list(node.right) * int(ast.literal_eval(node.left))
    raise ValueError("not a list expression")


# What Megatron's args cannot say: the HF model type (llama vs mistral: the same tensors), and
# fields that change no tensor. A preset may set them; everything else it must agree with.
GUESSED_FROM_ARGS = ("model_type", "max_position_embeddings", "sliding_window", "dtype")


def spec_is_guessed(common: dict) -> bool:
    ours = common.get("reshard") if isinstance(common, dict) else None
    return not (isinstance(ours, dict) and isinstance(ours.get("spec"), dict))


def guessed_fields(common: dict, spec: ModelSpec) -> Tuple[str, ...]:
    """The spec fields a preset may set for this checkpoint (none when it carries our own record; a BERT's
    position table is read from its tensors)."""
    if not spec_is_guessed(common):
        return ()
    return tuple(f for f in GUESSED_FROM_ARGS if not (spec.is_encoder and f == "max_position_embeddings"))


def layout_from_args(args: Any, spec: ModelSpec) -> Layout:
    vpp = _get(args, "virtual_pipeline_model_parallel_size")
    per_vstage = _get(args, "num_layers_per_virtual_pipeline_stage")
    pp = int(_get(args, "pipeline_model_parallel_size", default=1))
    if vpp is None and per_vstage:
        vpp = spec.num_layers // (pp * int(per_vstage))
    return Layout(
        tp=int(_get(args, "tensor_model_parallel_size", default=1)),
        pp=pp,
        vpp=int(vpp) if vpp and int(vpp) > 1 else None,
        ep=int(_get(args, "expert_model_parallel_size", default=1)),
        etp=_etp(args),
        first_stage_layers=_get(args, "decoder_first_pipeline_num_layers"),
        last_stage_layers=_get(args, "decoder_last_pipeline_num_layers"),
        make_vocab_size_divisible_by=int(_get(args, "make_vocab_size_divisible_by", default=128)),
    )


def _etp(args: Any) -> Optional[int]:
    etp = _get(args, "expert_tensor_parallel_size")
    tp = int(_get(args, "tensor_model_parallel_size", default=1))
    return None if etp is None or int(etp) == tp else int(etp)


def layout_of_common(common: dict, spec: ModelSpec) -> Layout:
    ours = common.get("reshard") if isinstance(common, dict) else None
    if isinstance(ours, dict) and isinstance(ours.get("layout"), dict):
        known = {f.name for f in dataclasses.fields(Layout)}
        return Layout(**{k: v for k, v in ours["layout"].items() if k in known})
    return layout_from_args(common["args"], spec)


def model_args_dict(args: Any) -> Dict[str, Any]:
    """The args fields that define the model and layout (compared across rank files)."""
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
              "virtual_pipeline_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
              "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "add_qkv_bias",
              "untie_embeddings_and_output_weights", "rotary_base", "iteration")
    return {f: _get(args, f) for f in fields}


# ------------------------------------------------------------------- directories

TRACKER = "latest_checkpointed_iteration.txt"


# the args of a training run that say where it stands and how it trains: carried with its optimizer state
# (Megatron-LM reads consumed_*_samples back from the checkpoint's args to resume its data order)
TRAINING_ARGS = ("consumed_train_samples", "consumed_valid_samples", "skipped_train_samples", "train_iters",
                 "train_samples", "global_batch_size", "micro_batch_size", "seq_length", "seed", "optimizer", "lr",
                 "min_lr", "lr_decay_style", "lr_decay_iters", "lr_decay_samples", "lr_warmup_iters",
                 "lr_warmup_samples", "lr_warmup_fraction", "weight_decay", "start_weight_decay", "end_weight_decay",
                 "weight_decay_incr_style", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "use_distributed_optimizer",
                 "ddp_bucket_size", "overlap_grad_reduce", "overlap_param_gather", "grad_reduce_in_fp32",
                 "accumulate_allreduce_grads_in_fp32", "loss_scale", "initial_loss_scale")
# layout-dependent args a training run's job recomputes: not carried from the source's layout
DP_ARGS = ("data_parallel_size", "world_size")


def carry_training_state(common: dict, optimizer: dict, dp: Optional[int] = None) -> None:
    """A Megatron training checkpoint resharded with its optimizer state: the source's training args (the
    samples consumed, the schedule, the optimizer's settings) replace the defaults, its DP-dependent args are
    left for the resuming job to set, and the learning-rate scheduler's state is carried."""
    src, args = optimizer.get("args"), common["args"]
    for name in TRAINING_ARGS:
        value = _get(src, name)
        if value is not None:
            setattr(args, name, value)
    for name in DP_ARGS:
        setattr(args, name, None)
    if dp:  # the resuming job's data-parallel size, when it was given (parallel.target_dp)
        args.data_parallel_size = dp
        args.world_size = dp * args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if optimizer.get("true_vocab"):  # the padding rows were carried as rows: the vocab is still the vocab
        args.vocab_size = optimizer["true_vocab"]
        common["reshard"]["spec"]["vocab_size"] = optimizer["true_vocab"]
    if optimizer.get("scheduler") is not None:
        common["opt_param_scheduler"] = optimizer["scheduler"]


def iteration_dirname(iteration: Optional[int]) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def write_tracker(root: str, iteration: Optional[int]) -> None:
    """``latest_checkpointed_iteration.txt``: ``release`` or the iteration, as Megatron writes it."""
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write("release" if iteration is None else str(iteration))


def checkpoint_dir(root: str, iteration: Optional[int], marker) -> Tuple[str, Optional[int]]:
    """The directory of one saved iteration: ``iteration`` if given, else what the tracker file
    says. ``root`` may also be that directory itself (``marker(dir)`` is true for it)."""
    import os

    if marker(root) and not os.path.isfile(os.path.join(root, TRACKER)):
        base = os.path.basename(os.path.normpath(root))
        it = int(base[5:]) if base.startswith("iter_") and base[5:].isdigit() else None
        return root, it
    if iteration is None:
        tracker = os.path.join(root, TRACKER)
        try:
            with open(tracker) as f:
                text = f.read().strip()
        except FileNotFoundError:
            raise SourceError(f"{root}: no {TRACKER}; point source.path at the checkpoint directory (the one "
                              "holding the tracker file) or set source.iteration") from None
        if text == "release":
            d, it = os.path.join(root, "release"), None
        elif text.isdigit():
            it = int(text)
            d = os.path.join(root, iteration_dirname(it))
        else:
            raise SourceError(f"{tracker} holds {text!r}: expected an iteration number or 'release'")
    else:
        it = iteration
        d = os.path.join(root, iteration_dirname(iteration))
    if not os.path.isdir(d):
        have = sorted(x for x in os.listdir(root) if x.startswith("iter_") or x == "release")
        raise SourceError(f"{d} does not exist (saved iterations here: {have or 'none'})")
    return d, it
