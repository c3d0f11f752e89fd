"""The pattern of the usual export scripts, as a baseline: one process loads the whole torch_dist
checkpoint with torch.distributed.checkpoint into full tensors, unstacks the layers, splits fused
QKV and [gate; up], drops the vocab padding and saves HF safetensors shards.

    python benchmarks/single_process_td_to_hf.py SRC_ITER_DIR DST_DIR NUM_HEADS NUM_KV_HEADS VOCAB

Prints ``peak_rss_mb=<n>`` at the end.
"""

import os
import sys

from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from reshard.formats.torch_dist import load_full  # noqa: E402
from reshard.progress import peak_rss_mb  # noqa: E402
from reshard.transforms import split_gated, split_qkv  # noqa: E402

SHARD_BYTES = 5 * 10**9


def main():
    src, dst = sys.argv[1], sys.argv[2]
    nh, ng, vocab = map(int, sys.argv[3:6])
    t, _ = load_full(src)
    L = t["decoder.layers.self_attention.linear_qkv.weight"].shape[0]
    hd = t["decoder.layers.self_attention.linear_qkv.weight"].shape[1] // (nh + 2 * ng)
    hf = {"model.embed_tokens.weight": t.pop("embedding.word_embeddings.weight")[:vocab].clone(),
          "model.norm.weight": t.pop("decoder.final_layernorm.weight")}
    if "output_layer.weight" in t:
        hf["lm_head.weight"] = t.pop("output_layer.weight")[:vocab].clone()
    for i in range(L):
        p = f"model.layers.{i}."
        q, k, v = split_qkv(t["decoder.layers.self_attention.linear_qkv.weight"][i], nh, ng, hd)
        gate, up = split_gated(t["decoder.layers.mlp.linear_fc1.weight"][i])
        hf.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": t["decoder.layers.self_attention.linear_proj.weight"][i],
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": t["decoder.layers.mlp.linear_fc2.weight"][i],
                   p + "input_layernorm.weight": t["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][i],
                   p + "post_attention_layernorm.weight": t["decoder.layers.mlp.linear_fc1.layer_norm_weight"][i]})
    del t
    os.makedirs(dst, exist_ok=True)
    shard, size, k = {}, 0, 0
    for name in list(hf):
        w = hf.pop(name).contiguous()
        if shard and size + w.nbytes > SHARD_BYTES:
            save_file(shard, os.path.join(dst, f"model-{k:05d}.safetensors"))
            shard, size, k = {}, 0, k + 1
        shard[name] = w
        size += w.nbytes
    save_file(shard, os.path.join(dst, f"model-{k:05d}.safetensors"))
    print(f"peak_rss_mb={peak_rss_mb():.0f}")


if __name__ == "__main__":
    main()
