"""The Megatron ``args`` namespace and common state written with every Megatron checkpoint.

Only plain Python values, ``argparse.Namespace`` and torch dtypes go in, so
``torch.load(weights_only=True)`` (with Megatron's safe globals) accepts it and no Megatron
class is needed to write it. The real rope settings and the padded vocab are written - not
``rotary_base=10000`` regardless, as Megatron's own converter did.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Optional

import torch

from ..layout import Layout
from ..spec import ModelSpec

CHECKPOINT_VERSION = 3.0


def make_args(spec: ModelSpec, layout: Layout, dtype: torch.dtype, ckpt_format: str,
              transformer_impl: str = "transformer_engine", iteration: Optional[int] = None,
              moe_grouped_gemm: bool = False) -> Namespace:
    rs = dict(spec.rope_scaling or {})
    llama3_scaling = rs.get("rope_type") == "llama3"
    args = dict(
        **_mla_args(spec, rs),
        # architecture
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        group_query_attention=spec.num_query_groups != spec.num_attention_heads,
        kv_channels=spec.head_dim,
        seq_length=spec.max_position_embeddings,
        max_position_embeddings=spec.max_position_embeddings,
        vocab_size=spec.vocab_size,
        padded_vocab_size=layout.padded_vocab(spec.vocab_size),
        make_vocab_size_divisible_by=layout.make_vocab_size_divisible_by,
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=spec.norm_eps,
        layernorm_epsilon=spec.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm or spec.mla,  # MLA: the q/kv latent norms
        untie_embeddings_and_output_weights=not spec.tie_word_embeddings,
        position_embedding_type="rope",
        add_position_embedding=False,  # compared by Megatron's check_checkpoint_args
        use_rotary_position_embeddings=True,  # the older spelling
        rotary_base=spec.rope_theta,
        rotary_percent=1.0,
        use_rope_scaling=llama3_scaling,
        rope_scaling_factor=float(rs.get("factor", 8.0)) if llama3_scaling else 8.0,
        disable_bias_linear=True,
        num_experts=spec.num_experts or None,
        moe_ffn_hidden_size=spec.expert_ffn if spec.is_moe else None,
        moe_router_topk=spec.num_experts_per_tok if spec.is_moe else 2,
        moe_router_pre_softmax=spec.is_moe and not spec.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32" if spec.is_moe else None,
        moe_router_enable_expert_bias=spec.moe_expert_bias,
        moe_router_score_function=spec.moe_router_score_function,
        moe_router_num_groups=spec.moe_router_num_groups or None,
        moe_router_group_topk=spec.moe_router_group_topk or None,
        moe_router_topk_scaling_factor=spec.moe_router_topk_scaling_factor if spec.is_moe else None,
        mtp_num_layers=None,  # multi-token-prediction layers are not converted
        moe_shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size or None,
        moe_shared_expert_gate=spec.shared_expert_gate,
        moe_grouped_gemm=moe_grouped_gemm,
        moe_token_dispatcher_type="alltoall" if layout.ep > 1 else "allgather",
        # Megatron's pattern: 1 = MoE layer, 0 = dense (a list makes torch_dist key every layer separately)
        moe_layer_freq=[0 if i in spec.dense_layers else 1 for i in range(spec.num_layers)] if spec.dense_layers else 1,
        transformer_impl=transformer_impl,
        # dtype
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # layout
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_per_virtual_pipeline_stage=(spec.num_layers // (layout.pp * layout.vpp)) if layout.vpp else None,
        decoder_first_pipeline_num_layers=layout.first_stage_layers,
        decoder_last_pipeline_num_layers=layout.last_stage_layers,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp or layout.tp,
        ckpt_format=ckpt_format,
        iteration=iteration or 0,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )
    if spec.is_encoder:
        args.update(_bert_args(spec))
    return Namespace(**args)


def _bert_args(spec: ModelSpec) -> dict:
    """Megatron-LM's pretrain_bert flags: LayerNorm, GeLU, biases, learned absolute positions; the
    binary head (``--bert-no-binary-head`` clears it; token types are 2 with it, else 0)."""
    return dict(swiglu=False, normalization="LayerNorm", add_bias_linear=True, disable_bias_linear=False,
                add_qkv_bias=True, qk_layernorm=False, position_embedding_type="learned_absolute",
                add_position_embedding=True, use_rotary_position_embeddings=False, use_rope_scaling=False,
                bert_binary_head=spec.binary_head, num_tokentypes=spec.num_tokentypes)


def _mla_args(spec: ModelSpec, rs: dict) -> dict:
    """Multi-latent attention and its RoPE (Megatron-LM's --multi-latent-attention flags)."""
    if not spec.mla:
        return {"multi_latent_attention": False}
    yarn = rs.get("rope_type") == "yarn"
    return dict(
        multi_latent_attention=True, q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank,
        qk_head_dim=spec.qk_nope_head_dim, qk_pos_emb_head_dim=spec.qk_rope_head_dim, v_head_dim=spec.v_head_dim,
        rope_type="yarn" if yarn else "rope", rotary_scaling_factor=float(rs.get("factor", 1.0)),
        mscale=float(rs.get("mscale", 1.0)), mscale_all_dim=float(rs.get("mscale_all_dim", 0.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", spec.max_position_embeddings)),
        beta_fast=float(rs.get("beta_fast", 32)), beta_slow=float(rs.get("beta_slow", 1)),
    )


def common_state(spec: ModelSpec, layout: Layout, dtype: torch.dtype, ckpt_format: str,
                 iteration: Optional[int], transformer_impl: str, source: dict,
                 moe_grouped_gemm: bool = False) -> dict:
    return {
        "args": make_args(spec, layout, dtype, ckpt_format, transformer_impl, iteration, moe_grouped_gemm),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration or 0,
        # Self-describing: enough to read it back with no reference model (DESIGN.md).
        "reshard": {
            "spec": spec.to_dict(),
            "layout": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "ep": layout.ep,
                       "etp": layout.etp, "first_stage_layers": layout.first_stage_layers,
                       "last_stage_layers": layout.last_stage_layers,
                       "make_vocab_size_divisible_by": layout.make_vocab_size_divisible_by,
                       "moe_grouped_gemm": moe_grouped_gemm},
            "source": source,
        },
    }
