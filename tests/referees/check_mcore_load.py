"""torchrun script: load a torch_dist checkpoint into a real Megatron-core GPTModel at a given
TP/PP with ``dist_checkpointing.load`` (default strictness) and compare every parameter of
every rank with the HF source mapped by hand (independent of reshard's planner).

    torchrun --nproc-per-node 4 tests/referees/check_mcore_load.py CKPT HF_DIR TP PP

Prints one ``OK <n> tensors equal`` line per rank, or raises naming the first difference.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from reshard.transforms import gated_tp_shard, merge_gated, merge_qkv, pad_vocab  # noqa: E402
from tests.expected import load_hf  # noqa: E402
from tests.referees import mcore  # noqa: E402


def expected_local(name, hf, spec, tp, tp_rank, layer_offset, padded):
    chunk0 = lambda t: t.chunk(tp, dim=0)[tp_rank]  # noqa: E731
    chunk1 = lambda t: t.chunk(tp, dim=1)[tp_rank]  # noqa: E731
    if name == "embedding.word_embeddings.weight":
        return chunk0(pad_vocab(hf["model.embed_tokens.weight"], padded))
    if name == "output_layer.weight":
        w = hf["model.embed_tokens.weight"] if spec["tie_word_embeddings"] else hf["lm_head.weight"]
        return chunk0(pad_vocab(w, padded))
    if name == "decoder.final_layernorm.weight":
        return hf["model.norm.weight"]
    parts = name.split(".")
    i = int(parts[2]) + layer_offset
    rest = ".".join(parts[3:])
    p = f"model.layers.{i}."
    ng = spec["num_query_groups"]
    if rest == "input_layernorm.weight":
        return hf[p + "input_layernorm.weight"]
    if rest == "pre_mlp_layernorm.weight":
        return hf[p + "post_attention_layernorm.weight"]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        qkv = merge_qkv(*(hf[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"), ng)
        return chunk0(qkv)
    if rest == "self_attention.linear_proj.weight":
        return chunk1(hf[p + "self_attn.o_proj.weight"])
    if rest == "mlp.linear_fc1.weight":
        return gated_tp_shard(merge_gated(hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]), tp, tp_rank)
    if rest == "mlp.linear_fc2.weight":
        return chunk1(hf[p + "mlp.down_proj.weight"])
    raise KeyError(f"no expectation for {name}")


def main():
    ckpt, hf_dir, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import load_common_state_dict

    common = load_common_state_dict(ckpt)
    spec = common["reshard"]["spec"]
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == spec["num_layers"]
    vocab_mult = common["args"].make_vocab_size_divisible_by * tp
    padded = -(-spec["vocab_size"] // vocab_mult) * vocab_mult
    model = mcore.build_gpt(spec, tp, pp, padded)
    mcore.load_torch_dist(model, ckpt)
    hf = load_hf(hf_dir)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    offset = pp_rank * (spec["num_layers"] // pp)
    n = 0
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        exp = expected_local(name, hf, spec, tp, tp_rank, offset, padded)
        if t.shape != exp.shape or not torch.equal(t, exp.to(t.dtype)):
            raise AssertionError(f"rank {dist.get_rank()} (tp {tp_rank}, pp {pp_rank}): {name} differs "
                                 f"(shape {tuple(t.shape)} vs {tuple(exp.shape)})")
        n += 1
    assert n > 0
    print(f"OK rank {dist.get_rank()} tp {tp_rank} pp {pp_rank}: {n} tensors equal", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
