"""Independent expectations: what a torch_dist checkpoint must hold, computed from the HF
tensors with the pure transforms (never with reshard's planner), and a plain-DCP reader."""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from reshard.formats.torch_dist import load_full
from reshard.transforms import merge_gated, merge_qkv, pad_vocab


def load_hf(hf_dir: str) -> dict:
    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, f), "pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
    return out


def expected_torch_dist(hf: dict, spec: dict, padded_vocab: int) -> dict:
    L, ng = spec["num_layers"], spec["num_query_groups"]
    lay = lambda i, n: hf[f"model.layers.{i}.{n}"]  # noqa: E731
    stack = lambda f: torch.stack([f(i) for i in range(L)])  # noqa: E731
    out = {
        "embedding.word_embeddings.weight": pad_vocab(hf["model.embed_tokens.weight"], padded_vocab),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": stack(lambda i: lay(i, "input_layernorm.weight")),
        "decoder.layers.self_attention.linear_qkv.weight": stack(
            lambda i: merge_qkv(*(lay(i, f"self_attn.{x}_proj.weight") for x in "qkv"), ng)),
        "decoder.layers.self_attention.linear_proj.weight": stack(lambda i: lay(i, "self_attn.o_proj.weight")),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": stack(lambda i: lay(i, "post_attention_layernorm.weight")),
        "decoder.layers.mlp.linear_fc1.weight": stack(
            lambda i: merge_gated(lay(i, "mlp.gate_proj.weight"), lay(i, "mlp.up_proj.weight"))),
        "decoder.layers.mlp.linear_fc2.weight": stack(lambda i: lay(i, "mlp.down_proj.weight")),
    }
    if not spec["tie_word_embeddings"]:
        out["output_layer.weight"] = pad_vocab(hf["lm_head.weight"], padded_vocab)
    if spec["qkv_bias"]:
        out["decoder.layers.self_attention.linear_qkv.bias"] = stack(
            lambda i: merge_qkv(*(lay(i, f"self_attn.{x}_proj.bias") for x in "qkv"), ng))
    return out


def read_dcp(ckpt_dir: str):
    """(tensors, objects) of a DCP checkpoint, read with plain torch.distributed.checkpoint."""
    return load_full(ckpt_dir)
