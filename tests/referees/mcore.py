"""Megatron-core as a referee, on CPU with gloo (FORMATS.md §6).

Run under torchrun (or spawn) with an initialised gloo process group. Builds a tiny
``GPTModel`` with the local spec at a given TP/PP, and loads torch_dist checkpoints with
``dist_checkpointing.load``. Test-only: the package itself never imports Megatron.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch
import torch.distributed as dist


def patch_cuda_for_cpu() -> None:
    """Megatron-core assumes CUDA in a few places; make them harmless on CPU."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None


@contextlib.contextmanager
def tensor_cuda_is_identity():
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def init_model_parallel(tp: int, pp: int, ep: int = 1, etp=None) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
    )
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


class CpuCoreAttention(torch.nn.Module):
    """Causal softmax attention whose q/k and v head sizes differ, for multi-latent attention on CPU:
    megatron-core 0.19.2's local DotProductAttention refuses MLA (``__init__() got an unexpected keyword
    argument 'k_channels'``) and its MLA otherwise needs Transformer Engine's attention. Only the score
    kernel is ours; every projection, norm, rotary embedding and the router are Megatron-core's."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type=None, softmax_scale=None,
                 k_channels=None, v_channels=None, **kwargs):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        scale = self.softmax_scale if self.softmax_scale is not None else q.shape[-1] ** -0.5
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        s = q.shape[2]
        scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1), float("-inf"))
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)


def mla_config(spec: dict) -> dict:
    """MLATransformerConfig fields of a DeepSeek-V3 spec (RoPE without yarn scaling for tiny models)."""
    rs = spec.get("rope_scaling") or {}
    return dict(
        multi_latent_attention=True, q_lora_rank=spec["q_lora_rank"], kv_lora_rank=spec["kv_lora_rank"],
        qk_head_dim=spec["qk_nope_head_dim"], qk_pos_emb_head_dim=spec["qk_rope_head_dim"],
        v_head_dim=spec["v_head_dim"], rope_type=rs.get("rope_type", "rope") if rs else "rope",
        rotary_base=spec.get("rope_theta", 10000), rotary_scaling_factor=float(rs.get("factor", 1.0)),
        mscale=float(rs.get("mscale", 1.0)), mscale_all_dim=float(rs.get("mscale_all_dim", 0.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings",
                                                    spec.get("max_position_embeddings", 4096))),
        qk_layernorm=True,
    )


def moe_config(spec: dict, ep: int, etp=None) -> dict:
    """TransformerConfig fields of a mixture-of-experts spec (FORMATS.md §6: allgather
    dispatcher, SequentialMLP experts); empty for a dense one."""
    if not spec.get("num_experts"):
        return {}
    out = dict(
        num_moe_experts=spec["num_experts"],
        moe_ffn_hidden_size=spec.get("moe_ffn_hidden_size") or spec["ffn_hidden_size"],
        moe_router_topk=spec["num_experts_per_tok"],
        moe_router_pre_softmax=not spec.get("moe_norm_topk_prob", True),
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_router_load_balancing_type="none",
    )
    if spec.get("moe_router_score_function", "softmax") != "softmax":
        out.update(moe_router_score_function=spec["moe_router_score_function"], moe_router_dtype="fp32")
    if spec.get("moe_expert_bias"):
        out["moe_router_enable_expert_bias"] = True
    if spec.get("moe_router_num_groups"):
        out.update(moe_router_num_groups=spec["moe_router_num_groups"], moe_router_group_topk=spec["moe_router_group_topk"])
    if spec.get("moe_router_topk_scaling_factor", 1.0) != 1.0:
        out["moe_router_topk_scaling_factor"] = spec["moe_router_topk_scaling_factor"]
    if spec.get("dense_layers"):  # a per-layer pattern: 1 = MoE, 0 = dense
        out["moe_layer_freq"] = [0 if i in spec["dense_layers"] else 1 for i in range(spec["num_layers"])]
    if spec.get("shared_expert_ffn_hidden_size"):
        out["moe_shared_expert_intermediate_size"] = spec["shared_expert_ffn_hidden_size"]
        if spec.get("shared_expert_gate"):
            out["moe_shared_expert_gate"] = True
    return out


def transformer_config(spec: dict, tp: int, pp: int, dtype=torch.float32, ep: int = 1, etp=None):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    mla = spec.get("kv_lora_rank", 0) > 0
    return (MLATransformerConfig if mla else TransformerConfig)(
        **moe_config(spec, ep, etp),
        **(mla_config(spec) if mla else {"kv_channels": spec["head_dim"],
                                         "qk_layernorm": spec["model_type"] in ("qwen3", "qwen3_moe")}),
        num_layers=spec["num_layers"],
        hidden_size=spec["hidden_size"],
        num_attention_heads=spec["num_attention_heads"],
        num_query_groups=spec["num_query_groups"],
        ffn_hidden_size=spec["ffn_hidden_size"],
        normalization="RMSNorm",
        layernorm_epsilon=spec["norm_eps"],
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.get("qkv_bias", False),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype if pp > 1 else None,
        params_dtype=dtype,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def build_gpt(spec: dict, tp: int, pp: int, padded_vocab: int, dtype=torch.float32, ep: int = 1, etp=None):
    """A GPTModel (local spec) for this rank's TP/PP position."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    patch_cuda_for_cpu()
    init_model_parallel(tp, pp, ep, etp)
    cfg = transformer_config(spec, tp, pp, dtype, ep, etp)
    qk = spec["model_type"] in ("qwen3", "qwen3_moe")
    if spec.get("dense_layers") or cfg.multi_latent_attention:  # Megatron's block spec from moe_layer_freq
        layer_spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False,
                                                pp_rank=parallel_state.get_pipeline_model_parallel_rank())
        if cfg.multi_latent_attention:
            from megatron.core.transformer.identity_op import IdentityOp

            for ls in layer_spec.layer_specs:
                ls.submodules.self_attention.submodules.core_attention = CpuCoreAttention
                if spec.get("q_lora_rank") is None:  # no q latent, so no q latent norm
                    ls.submodules.self_attention.submodules.q_layernorm = IdentityOp
    else:
        layer_spec = get_gpt_layer_local_spec(num_experts=spec.get("num_experts") or None, moe_grouped_gemm=False,
                                              qk_layernorm=qk)
    with warnings.catch_warnings(), tensor_cuda_is_identity():
        warnings.simplefilter("ignore")
        model = GPTModel(
            config=cfg,
            transformer_layer_spec=layer_spec,
            vocab_size=padded_vocab,
            max_sequence_length=spec.get("max_position_embeddings", 4096),
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=spec.get("tie_word_embeddings", False),
            position_embedding_type="rope",
            rotary_base=int(spec.get("rope_theta", 10000)),
        )
    return model.to(dtype)


def load_torch_dist(model, ckpt_dir: str) -> None:
    """``dist_checkpointing.load`` at the default strictness into ``model``."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    state = dist_checkpointing.load(sharded, ckpt_dir)
    own = set(model.state_dict())
    # load() merges the common state (args, iteration, ...) into the result; keep model keys.
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


def logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Megatron's own forward pass (one pipeline stage, any TP) on ``tokens`` ``[b, s]``: the
    ``[b, s, vocab]`` logits, vocab-parallel shards gathered and the padding rows dropped."""
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    # explicit causal mask (True = masked out): the default one is built on cuda
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s).expand(b, 1, s, s)
    model.eval()
    with torch.no_grad():
        out = model(tokens, position_ids, mask)
    # the rotary embeddings' forward is an lru_cache: it would keep the module (and its process groups) alive
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    RotaryEmbedding.forward.cache_clear()
    YarnRotaryEmbedding.forward.cache_clear()
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out[..., :vocab]


def rank_print(*a):
    print(f"[rank {dist.get_rank()}]", *a, flush=True)


def say(line: str) -> None:
    """One line to stdout in a single write: ranks share the pipe, and with PYTHONUNBUFFERED a
    print() of text and newline is two writes that another rank's line can fall between."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
