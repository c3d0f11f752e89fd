"""DeepSeek-V3 family (DeepSeek-V3/R1, Kimi-K2, Moonlight; V2-Lite's shape without q_lora): multi-latent
attention, dense first layers, routed experts with sigmoid scores and a score-correction bias, and
ungated shared experts (FORMATS.md §7; Megatron-Bridge ``deepseek/common.py``).

Multi-latent attention, HF ``self_attn.`` -> Megatron-core ``self_attention.``: the down-projections and
the latent norms are replicated over TP (Transformer Engine's duplicated linears; the local spec's
ColumnParallelLinear down-projections split their rows in legacy files - ``local_tp_rule``); the
up-projections split their rows by heads, and ``o_proj`` its columns. Rows keep HF's per-head order (``[nope | rope]`` for q, ``[k_nope | v]`` for kv_b): no permutation.
HF's interleaved RoPE pairs are what Megatron-core's MLA rotary de-interleaves itself. The latent norms are
``q_layernorm`` / ``kv_layernorm`` under the local spec and fused into the up-projections under TE.
"""

import dataclasses

from ..mapping import Column, MappingTable, Replicated, Row
from . import llama
from .moe import _moe_block, shared_experts

_L = "model.layers.{i}."
_A = _L + "self_attn."

_MLA = (
    Replicated(mcore="input_layernorm.weight", hf=_L + "input_layernorm.weight", dims=("hidden",)),
    Replicated(mcore="self_attention.linear_q_down_proj.weight", when="q_lora", hf=_A + "q_a_proj.weight",
               extra_state="self_attention.linear_q_down_proj", dims=("q_lora", "hidden"), local_tp_rule="column"),
    Replicated(mcore="self_attention.linear_q_up_proj.layer_norm_weight", local="self_attention.q_layernorm.weight",
               aliases=("self_attention.q_layernorm.weight",), when="q_lora", hf=_A + "q_a_layernorm.weight",
               dims=("q_lora",)),
    Column(mcore="self_attention.linear_q_up_proj.weight", when="q_lora", hf=_A + "q_b_proj.weight",
           extra_state="self_attention.linear_q_up_proj", dims=("q_up", "q_lora")),
    Column(mcore="self_attention.linear_q_proj.weight", when="no_q_lora", hf=_A + "q_proj.weight",
           extra_state="self_attention.linear_q_proj", dims=("q_up", "hidden")),
    Replicated(mcore="self_attention.linear_kv_down_proj.weight", hf=_A + "kv_a_proj_with_mqa.weight",
               extra_state="self_attention.linear_kv_down_proj", dims=("kv_down", "hidden"), local_tp_rule="column"),
    Replicated(mcore="self_attention.linear_kv_up_proj.layer_norm_weight", local="self_attention.kv_layernorm.weight",
               aliases=("self_attention.kv_layernorm.weight",), hf=_A + "kv_a_layernorm.weight", dims=("kv_lora",)),
    Column(mcore="self_attention.linear_kv_up_proj.weight", hf=_A + "kv_b_proj.weight",
           extra_state="self_attention.linear_kv_up_proj", dims=("kv_up", "kv_lora")),
    Row(mcore="self_attention.linear_proj.weight", hf=_A + "o_proj.weight", extra_state="self_attention.linear_proj",
        dims=("hidden", "v_rows")),
)


def _local_dense_norm(e):
    """Megatron-core keys an MLA model's local-spec norms by their own names in torch_dist (no TE
    remapping): a dense layer's pre-MLP norm is written under both spellings, as the latent norms are."""
    if e.mcore == "mlp.linear_fc1.layer_norm_weight":
        return dataclasses.replace(e, aliases=("pre_mlp_layernorm.weight",))
    return e


DEEPSEEK_V3 = MappingTable(
    family="deepseek_v3",
    top=llama.TABLE.top,
    layer=_MLA + tuple(_local_dense_norm(e) for e in _moe_block(
        _L + "mlp.gate", _L + "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
        shared=shared_experts("mlp.shared_experts."))),
    dropped=llama.TABLE.dropped,
)
