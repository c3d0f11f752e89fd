"""Mixture-of-experts families: Mixtral (routed experts), Qwen2-MoE (routed experts plus a
gated shared expert) and Qwen3-MoE (Qwen2-MoE's names, no shared expert, q/k norms: the same
table, whose shared-expert and q/k-norm entries apply only to specs that have them). Attention is
the Llama table's; every layer's MLP is an MoE block.

Megatron-core names (FORMATS.md §3, MoE): router ``mlp.router.weight`` ``[E, h]`` (replicated,
fp32 in Megatron runs - its dtype is kept), experts as SequentialMLP modules
``mlp.experts.local_experts.{j}.linear_fc{1,2}`` (``j`` local to the expert-parallel rank) or
TE grouped GEMM ``mlp.experts.linear_fc{1,2}.weight{j}``, split over expert-TP like a dense MLP;
torch_dist keys ``decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight`` ``[L, E, ...]``.
The MoE layer's pre-MLP norm is its own module: ``pre_mlp_layernorm.weight`` under the TE spec,
``mlp.linear_fc1.layer_norm_weight`` in torch_dist from the local spec - written under both.
"""

import dataclasses

from ..mapping import GatedMLP, MappingTable, Replicated, Row
from . import llama

_L = "model.layers.{i}."
_ATTENTION = tuple(e for e in llama.TABLE.layer if not e.mcore.startswith("mlp."))
# A dense layer of a mixed model (spec.dense_layers): the Llama MLP, its norm fused into fc1 under the TE
# spec (mlp.linear_fc1.layer_norm_weight), pre_mlp_layernorm under the local spec, as Megatron-core builds it
_DENSE = tuple(dataclasses.replace(e, layers="dense") for e in llama.TABLE.layer if e.mcore.startswith("mlp."))
_EXP = "mlp.experts.local_experts.{j}."


def _moe_block(router: str, expert: str, gate: str, up: str, down: str, shared: tuple = ()) -> tuple:
    return _DENSE + tuple(dataclasses.replace(e, layers="moe") for e in (
        Replicated(mcore="pre_mlp_layernorm.weight", aliases=("mlp.linear_fc1.layer_norm_weight",),
                   hf=_L + "post_attention_layernorm.weight", dims=("hidden",)),
        Replicated(mcore="mlp.router.weight", hf=router + ".weight", dims=("experts", "hidden")),
        Replicated(mcore="mlp.router.expert_bias", when="expert_bias", hf=router + ".e_score_correction_bias",
                   dims=("experts",)),
        GatedMLP(mcore=_EXP + "linear_fc1.weight", dist="mlp.experts.experts.linear_fc1.weight",
                 grouped="mlp.experts.linear_fc1.weight{j}", extra_state=_EXP + "linear_fc1", is_expert=True,
                 gate=expert + gate, up=expert + up, ffn="moe_ffn"),
        Row(mcore=_EXP + "linear_fc2.weight", dist="mlp.experts.experts.linear_fc2.weight",
            grouped="mlp.experts.linear_fc2.weight{j}", extra_state=_EXP + "linear_fc2", is_expert=True,
            hf=expert + down, dims=("hidden", "moe_ffn")),
    ) + shared)


def shared_experts(prefix: str, gate: str = None) -> tuple:
    """Shared-expert entries (``prefix`` = the HF module, e.g. ``mlp.shared_expert.``), with the
    sigmoid gate ``[1, h]`` on their output when ``gate`` names it (Qwen2-MoE; DeepSeek has none)."""
    out = (
        GatedMLP(mcore="mlp.shared_experts.linear_fc1.weight", extra_state="mlp.shared_experts.linear_fc1",
                 when="shared_expert", gate=_L + prefix + "gate_proj.weight", up=_L + prefix + "up_proj.weight",
                 ffn="shared_ffn"),
        Row(mcore="mlp.shared_experts.linear_fc2.weight", extra_state="mlp.shared_experts.linear_fc2",
            when="shared_expert", hf=_L + prefix + "down_proj.weight", dims=("hidden", "shared_ffn")),
    )
    if gate:
        out += (Replicated(mcore="mlp.shared_experts.gate_weight", when="shared_gate", hf=_L + gate,
                           dims=("one", "hidden")),)
    return out


MIXTRAL = MappingTable(
    family="mixtral",
    top=llama.TABLE.top,
    layer=_ATTENTION + _moe_block(_L + "block_sparse_moe.gate", _L + "block_sparse_moe.experts.{e}.",
                                  "w1.weight", "w3.weight", "w2.weight"),
    dropped=llama.TABLE.dropped,
)

QWEN2_MOE = MappingTable(
    family="qwen2_moe",
    top=llama.TABLE.top,
    layer=_ATTENTION + _moe_block(
        _L + "mlp.gate", _L + "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
        shared=shared_experts("mlp.shared_expert.", gate="mlp.shared_expert_gate.weight")),
    dropped=llama.TABLE.dropped,
)
