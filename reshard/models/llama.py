"""Llama family: Llama-2 (MHA), Llama-3/3.1 (GQA, llama3 rope scaling), Mistral, Qwen2
(qkv bias, optionally tied embeddings), Qwen3 (per-head q/k RMSNorm, explicit head_dim).
One table; sizes are data in ``conf/model/``."""

from ..mapping import QKV, GatedMLP, MappingTable, Replicated, Row, Vocab

_L = "model.layers.{i}."

TABLE = MappingTable(
    family="llama",
    top=(
        Vocab(mcore="embedding.word_embeddings.weight", hf="model.embed_tokens.weight"),
        Replicated(mcore="decoder.final_layernorm.weight", hf="model.norm.weight", dims=("hidden",)),
        Vocab(mcore="output_layer.weight", hf="lm_head.weight", when="untied"),
    ),
    layer=(
        Replicated(mcore="self_attention.linear_qkv.layer_norm_weight", local="input_layernorm.weight",
                   hf=_L + "input_layernorm.weight", dims=("hidden",)),
        QKV(mcore="self_attention.linear_qkv.weight", extra_state="self_attention.linear_qkv",
            q=_L + "self_attn.q_proj.weight", k=_L + "self_attn.k_proj.weight", v=_L + "self_attn.v_proj.weight"),
        QKV(mcore="self_attention.linear_qkv.bias", when="qkv_bias", bias=True,
            q=_L + "self_attn.q_proj.bias", k=_L + "self_attn.k_proj.bias", v=_L + "self_attn.v_proj.bias"),
        # Qwen3: one RMSNorm [head_dim] shared by all query heads, one by all key heads, applied per head
        # before RoPE; replicated over TP (Megatron-core qk_layernorm=True, the same name in both specs)
        Replicated(mcore="self_attention.q_layernorm.weight", when="qk_norm", hf=_L + "self_attn.q_norm.weight",
                   dims=("head_dim",)),
        Replicated(mcore="self_attention.k_layernorm.weight", when="qk_norm", hf=_L + "self_attn.k_norm.weight",
                   dims=("head_dim",)),
        Row(mcore="self_attention.linear_proj.weight", extra_state="self_attention.linear_proj",
            hf=_L + "self_attn.o_proj.weight", dims=("hidden", "q_rows")),
        Replicated(mcore="mlp.linear_fc1.layer_norm_weight", local="pre_mlp_layernorm.weight",
                   hf=_L + "post_attention_layernorm.weight", dims=("hidden",)),
        GatedMLP(mcore="mlp.linear_fc1.weight", extra_state="mlp.linear_fc1",
                 gate=_L + "mlp.gate_proj.weight", up=_L + "mlp.up_proj.weight"),
        Row(mcore="mlp.linear_fc2.weight", extra_state="mlp.linear_fc2",
            hf=_L + "mlp.down_proj.weight", dims=("hidden", "ffn")),
    ),
    # Old checkpoints carry the rotary cache; it is recomputed from rope_theta.
    dropped=(_L + "self_attn.rotary_emb.inv_freq",),
)
