"""Independent expectations: what a torch_dist checkpoint must hold, computed from the HF
tensors with the pure transforms (never with reshard's planner), and a plain-DCP reader."""

from __future__ import annotations

import os
import re

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


def expected_hf_tp(hf: dict, spec: dict, tp: int, t: int, fused: bool = False, vocab_pad: int = 64) -> dict:
    """What vLLM's weight loaders leave on TP rank ``t`` (FORMATS.md §9), cut by hand from the HF tensors:
    q/k/v rows by heads (a kv head repeated over tp/ng ranks when there are fewer kv heads than ranks),
    gate/up/w1/w3 by rows, o/down/w2 by columns, vocab rows padded with zeros to a multiple of
    ``vocab_pad`` and split evenly, the rest whole; ``fused``: qkv_proj, gate_up_proj, experts w13/w2."""
    ng = spec["num_query_groups"]

    def cut(name, w):
        leaf = name.rsplit(".", 2)[-2]
        if leaf in ("embed_tokens", "lm_head"):
            padded = -(-w.shape[0] // vocab_pad) * vocab_pad
            return torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])]).chunk(tp)[t]
        if leaf in ("k_proj", "v_proj") and ng < tp:
            return w.chunk(ng)[t // (tp // ng)]
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3", "q_b_proj", "kv_b_proj"):
            return w.chunk(tp)[t]
        if leaf in ("o_proj", "down_proj", "w2"):
            return w.chunk(tp, dim=1)[t]
        return w

    out = {n: cut(n, w) for n, w in hf.items() if not n.endswith("rotary_emb.inv_freq")}
    if not fused:
        return out
    for n in [n for n in out if ".q_proj." in n]:
        out[n.replace("q_proj", "qkv_proj")] = torch.cat([out.pop(n.replace("q_proj", x)) for x in
                                                          ("q_proj", "k_proj", "v_proj")])
    for n in [n for n in out if ".gate_proj." in n and ".experts." not in n]:
        out[n.replace("gate_proj", "gate_up_proj")] = torch.cat([out.pop(n), out.pop(n.replace("gate_proj", "up_proj"))])
    experts = {}
    for n in [n for n in out if ".experts." in n and n.split(".experts.")[1].split(".")[0].isdigit()]:
        pre, rest = n.split(".experts.")
        e, leaf = int(rest.split(".")[0]), rest.split(".")[1]
        experts.setdefault(pre, {}).setdefault(e, {})[leaf] = out.pop(n)
    for pre, by_e in experts.items():
        gate, up, down = ("w1", "w3", "w2") if "w1" in by_e[0] else ("gate_proj", "up_proj", "down_proj")
        E = len(by_e)
        out[pre + ".experts.w13_weight"] = torch.stack([torch.cat([by_e[e][gate], by_e[e][up]]) for e in range(E)])
        out[pre + ".experts.w2_weight"] = torch.stack([by_e[e][down] for e in range(E)])
    return out


def fsdp_keys_from_torch_dist(key: str, shape: tuple) -> dict:
    """The keys and shapes Megatron-LM's ``convert-torch-dist-to-fsdp-dtensor --swiglu`` makes of one
    torch_dist model key (its rules restated: prefix, stacked layers split, per-layer expert stacks split
    per expert, SwiGLU fc1 halves), for comparing key lists. Note its one difference from what Megatron-FSDP
    names: a *stacked* expert key (``decoder.layers.mlp.experts.experts.linear_fc1.weight``, homogeneous
    MoE) is split by layer only and keeps ``.experts.experts.`` ``[E, ...]`` (``split_layers`` runs instead
    of ``split_expert_weights``, and the SwiGLU patterns do not match it)."""
    if "._extra_state" in key:
        return {}
    new, out = "model.module." + key, {}
    if ".layers." in new and not re.search(r"layers\.(\d+)\.", new):
        out = {new.replace(".layers.", f".layers.{i}."): shape[1:] for i in range(shape[0])}
    elif ".experts.experts." in new:
        base = new.replace(".experts.experts.", ".experts.")
        a, _, b = base.partition(".weight")
        out = {f"{a}.weight{e}{b}": shape[1:] for e in range(shape[0])}
    else:
        out = {new: shape}
    swiglu = (r"\.mlp\.linear_fc1\.weight", r"\.mlp\.experts\.linear_fc1\.weight(\d+)",
              r"\.mlp\.shared_experts\.linear_fc1\.weight")
    for k in list(out):
        if any(re.search(p, k) for p in swiglu):
            s = out.pop(k)
            half = (s[0] // 2,) + tuple(s[1:])
            out[re.sub(r"(weight\d*)(.*)", r"\1_w\2", k)] = half
            out[re.sub(r"(weight\d*)(.*)", r"\1_v\2", k)] = half
    return out
