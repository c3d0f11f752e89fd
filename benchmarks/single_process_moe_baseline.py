"""The pattern of the usual HF -> Megatron MoE import tools, as a baseline: one process loads the
whole Hugging Face checkpoint (every safetensors file), builds every rank's tensors - fused QKV,
``[gate; up]`` per TP rank, each expert-parallel rank's experts under local indices - and
``torch.save``s every ``mp_rank_TT_EEE`` file.

    python benchmarks/single_process_moe_baseline.py HF_DIR DST_ITER_DIR TP EP

(Mixtral names, Transformer-Engine spelling, SequentialMLP experts, no PP.) Prints
``peak_rss_mb=<n>`` at the end.
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))
sys.path.insert(0, HERE)
from reshard.progress import peak_rss_mb  # noqa: E402
from reshard.transforms import gated_tp_shard, merge_gated, merge_qkv, pad_vocab  # noqa: E402
from single_process_baseline import load_hf_dir  # noqa: E402


def main():
    src, dst = sys.argv[1], sys.argv[2]
    tp, ep = int(sys.argv[3]), int(sys.argv[4])
    cfg, hf = load_hf_dir(src)
    L, E, ng = cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_key_value_heads"]
    m = 128 * tp
    padded = -(-cfg["vocab_size"] // m) * m
    per = E // ep
    for e in range(ep):
        for t in range(tp):
            c0 = lambda w: w.chunk(tp, 0)[t].clone()  # noqa: E731
            c1 = lambda w: w.chunk(tp, 1)[t].clone()  # noqa: E731
            model = {"embedding.word_embeddings.weight": c0(pad_vocab(hf["model.embed_tokens.weight"], padded)),
                     "decoder.final_layernorm.weight": hf["model.norm.weight"],
                     "output_layer.weight": c0(pad_vocab(hf["lm_head.weight"], padded))}
            for i in range(L):
                p, q = f"model.layers.{i}.", f"decoder.layers.{i}."
                model[q + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
                model[q + "self_attention.linear_qkv.weight"] = c0(merge_qkv(
                    *(hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), ng))
                model[q + "self_attention.linear_proj.weight"] = c1(hf[p + "self_attn.o_proj.weight"])
                model[q + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
                model[q + "mlp.router.weight"] = hf[p + "block_sparse_moe.gate.weight"]
                for j in range(per):
                    x = p + f"block_sparse_moe.experts.{e * per + j}."
                    y = q + f"mlp.experts.local_experts.{j}."
                    model[y + "linear_fc1.weight"] = gated_tp_shard(
                        merge_gated(hf[x + "w1.weight"], hf[x + "w3.weight"]), tp, t)
                    model[y + "linear_fc2.weight"] = c1(hf[x + "w2.weight"])
            out = os.path.join(dst, f"mp_rank_{t:02d}_{e:03d}", "model_optim_rng.pt")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            torch.save({"checkpoint_version": 3.0, "iteration": 0, "model": model}, out)
    print(f"peak_rss_mb={peak_rss_mb():.0f}")


if __name__ == "__main__":
    main()
