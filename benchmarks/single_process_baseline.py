"""The pattern of the usual converters, as a baseline: one process loads every tensor of the
HF checkpoint, builds the full Megatron tensors (QKV fused, [gate; up], vocab padded, layers
stacked), and saves them with torch.distributed.checkpoint.

    python benchmarks/single_process_baseline.py SRC_HF_DIR DST_DIR TP

Prints ``peak_rss_mb=<n>`` at the end.
"""

import json
import os
import sys

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from reshard.progress import peak_rss_mb  # noqa: E402
from reshard.transforms import merge_gated, merge_qkv, pad_vocab  # noqa: E402


def load_hf_dir(src):
    """``(config, every tensor)`` of an HF checkpoint, all in memory - what these tools do."""
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    hf = {}
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            hf.update(load_file(os.path.join(src, name)))
    return cfg, hf


def main():
    src, dst, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg, hf = load_hf_dir(src)
    L, ng = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    m = 128 * tp
    padded = -(-cfg["vocab_size"] // m) * m
    lay = lambda i, n: hf.pop(f"model.layers.{i}.{n}")  # noqa: E731
    sd = {
        "embedding.word_embeddings.weight": pad_vocab(hf.pop("model.embed_tokens.weight"), padded),
        "output_layer.weight": pad_vocab(hf.pop("lm_head.weight"), padded),
        "decoder.final_layernorm.weight": hf.pop("model.norm.weight"),
    }
    cols = {k: [] for k in ("ln1", "qkv", "proj", "ln2", "fc1", "fc2")}
    for i in range(L):
        cols["ln1"].append(lay(i, "input_layernorm.weight"))
        cols["qkv"].append(merge_qkv(*(lay(i, f"self_attn.{x}_proj.weight") for x in "qkv"), ng))
        cols["proj"].append(lay(i, "self_attn.o_proj.weight"))
        cols["ln2"].append(lay(i, "post_attention_layernorm.weight"))
        cols["fc1"].append(merge_gated(lay(i, "mlp.gate_proj.weight"), lay(i, "mlp.up_proj.weight")))
        cols["fc2"].append(lay(i, "mlp.down_proj.weight"))
    names = {"ln1": "self_attention.linear_qkv.layer_norm_weight", "qkv": "self_attention.linear_qkv.weight",
             "proj": "self_attention.linear_proj.weight", "ln2": "mlp.linear_fc1.layer_norm_weight",
             "fc1": "mlp.linear_fc1.weight", "fc2": "mlp.linear_fc2.weight"}
    for k, ts in cols.items():
        sd["decoder.layers." + names[k]] = torch.stack(ts)
    os.makedirs(dst, exist_ok=True)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(dst, sync_files=False), no_dist=True)
    print(f"peak_rss_mb={peak_rss_mb():.0f}")


if __name__ == "__main__":
    main()
