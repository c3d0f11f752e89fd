"""torchrun script: load a torch_dist checkpoint into a real Megatron-core GPTModel at a given
TP/PP with ``dist_checkpointing.load`` (default strictness) and compare every parameter of
every rank with the HF source mapped by hand (independent of reshard's planner).

    torchrun --nproc-per-node 4 tests/referees/check_mcore_load.py CKPT HF_DIR TP PP [EP]

Mixture-of-experts checkpoints are loaded into an MoE GPTModel (local spec, SequentialMLP
experts, allgather dispatcher) at expert-parallel size EP; expert ``j`` of EP rank ``r`` is
global expert ``r*E/EP + j``.

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
from tests import procgroup  # noqa: E402
from tests.referees import mcore  # noqa: E402


MOE_HF = {  # model_type -> (router, expert prefix {e}, gate, up, down)
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp.gate", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("mlp.gate", "mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
}
SHARED_HF = {"qwen2_moe": "mlp.shared_expert.", "deepseek_v3": "mlp.shared_experts."}
# multi-latent attention, Megatron local-spec name -> (HF name, TP split dim or None = replicated)
MLA_HF = {
    "self_attention.linear_q_down_proj.weight": ("self_attn.q_a_proj.weight", 0),  # local spec: column-parallel
    "self_attention.q_layernorm.weight": ("self_attn.q_a_layernorm.weight", None),
    "self_attention.linear_q_up_proj.weight": ("self_attn.q_b_proj.weight", 0),
    "self_attention.linear_q_proj.weight": ("self_attn.q_proj.weight", 0),
    "self_attention.linear_kv_down_proj.weight": ("self_attn.kv_a_proj_with_mqa.weight", 0),
    "self_attention.kv_layernorm.weight": ("self_attn.kv_a_layernorm.weight", None),
    "self_attention.linear_kv_up_proj.weight": ("self_attn.kv_b_proj.weight", 0),
}


def expected_moe(rest, p, hf, spec, tp, tp_rank, experts):
    """``experts`` = (ep, ep_rank, etp, etp_rank) of this rank."""
    router, expert, gate, up, down = MOE_HF[spec["model_type"]]
    chunk1 = lambda t: t.chunk(tp, dim=1)[tp_rank]  # noqa: E731
    ep, ep_rank, etp, etp_rank = experts
    if rest == "mlp.router.weight":
        return hf[p + router + ".weight"]
    if rest == "mlp.router.expert_bias":
        return hf[p + router + ".e_score_correction_bias"]
    if rest.startswith("mlp.experts.local_experts."):
        j, fc = int(rest.split(".")[3]), rest.split(".")[4]
        g = ep_rank * (spec["num_experts"] // ep) + j
        x = p + expert.format(e=g)
        if fc == "linear_fc1":  # experts are split over expert-TP
            return gated_tp_shard(merge_gated(hf[x + gate + ".weight"], hf[x + up + ".weight"]), etp, etp_rank)
        return hf[x + down + ".weight"].chunk(etp, dim=1)[etp_rank]
    shared = p + SHARED_HF.get(spec["model_type"], "mlp.shared_expert.")
    if rest == "mlp.shared_experts.linear_fc1.weight":
        w = merge_gated(hf[shared + "gate_proj.weight"], hf[shared + "up_proj.weight"])
        return gated_tp_shard(w, tp, tp_rank)
    if rest == "mlp.shared_experts.linear_fc2.weight":
        return chunk1(hf[shared + "down_proj.weight"])
    if rest == "mlp.shared_experts.gate_weight":
        return hf[p + "mlp.shared_expert_gate.weight"]
    raise KeyError(f"no expectation for {rest}")


def expected_local(name, hf, spec, tp, tp_rank, layer_offset, padded, experts=None):
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
    if rest in MLA_HF and spec.get("kv_lora_rank"):
        name, dim = MLA_HF[rest]
        return hf[p + name] if dim is None else hf[p + name].chunk(tp, dim=dim)[tp_rank]
    if rest in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
        return hf[p + f"self_attn.{rest.split('.')[1][0]}_norm.weight"]  # one [head_dim] norm, every TP rank
    if rest == "self_attention.linear_proj.weight":
        return chunk1(hf[p + "self_attn.o_proj.weight"])
    if rest == "mlp.linear_fc1.weight":
        return gated_tp_shard(merge_gated(hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]), tp, tp_rank)
    if rest == "mlp.linear_fc2.weight":
        return chunk1(hf[p + "mlp.down_proj.weight"])
    return expected_moe(rest, p, hf, spec, tp, tp_rank, experts or (1, 0, tp, tp_rank))


def check_logits(model, hf_dir, spec, tp_rank):
    """Megatron's forward pass on the loaded weights against transformers' on the HF source."""
    from tests.referees import hf_logits

    tokens = hf_logits.tokens(spec["vocab_size"])
    ours = mcore.logits(model, tokens, spec["vocab_size"])
    ref = hf_logits.logits(hf_dir)
    diff = (ours - ref).abs().max().item()
    if not diff <= 1e-4:
        raise AssertionError(f"rank {dist.get_rank()}: Megatron logits differ from transformers' by {diff:.3g}")
    mcore.say(f"OK logits rank {dist.get_rank()} tp {tp_rank}: {tuple(ours.shape)} max |megatron - transformers| "
              f"= {diff:.2e}")


def check_one(ckpt, hf_dir, tp, pp, ep, resave=None, etp=None, legacy=None, logits=False):
    """Build the model at TP/PP/EP, ``dist_checkpointing.load`` CKPT into it, compare with HF.
    ``resave``: then save the loaded model the way Megatron does (``dist_checkpointing.save``
    and a legacy ``state_dict()`` file per rank) - Megatron-made sources with known weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import load_common_state_dict

    common = load_common_state_dict(ckpt)
    spec = common["reshard"]["spec"]
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == spec["num_layers"]
    vocab_mult = common["args"].make_vocab_size_divisible_by * tp
    padded = -(-spec["vocab_size"] // vocab_mult) * vocab_mult
    model = mcore.build_gpt(spec, tp, pp, padded, ep=ep, etp=etp)
    mcore.load_torch_dist(model, ckpt)
    hf = load_hf(hf_dir)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank() if etp else tp_rank
    experts = (ep, ep_rank, etp or tp, etp_rank)
    offset = pp_rank * (spec["num_layers"] // pp)

    def compare():
        n = 0
        for name, t in model.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            exp = expected_local(name, hf, spec, tp, tp_rank, offset, padded, experts)
            if t.shape != exp.shape or not torch.equal(t, exp.to(t.dtype)):
                raise AssertionError(f"rank {dist.get_rank()} (tp {tp_rank}, pp {pp_rank}): {name} differs "
                                     f"(shape {tuple(t.shape)} vs {tuple(exp.shape)})")
            n += 1
        assert n > 0
        return n

    n = compare()
    n_expert_weights = sum(".local_experts." in k and k.endswith("weight") for k in model.state_dict())
    mcore.say(f"OK rank {dist.get_rank()} tp {tp_rank} pp {pp_rank} ep {ep_rank}"
        + (f" etp {etp}:{etp_rank}" if etp else "") + f": {n} tensors equal"
        + (f" ({n_expert_weights} expert weights)" if n_expert_weights else ""))
    if logits and pp == 1:
        check_logits(model, hf_dir, spec, tp_rank)
    if resave:
        save_like_megatron(model, common, spec, resave, tp, pp, ep, tp_rank, pp_rank, ep_rank)
    if legacy:  # this rank's legacy file, strictly loaded into the same model, compared again
        d = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")
        state = torch.load(os.path.join(legacy, d, "model_optim_rng.pt"), weights_only=False)
        assert state["args"].expert_model_parallel_size == ep and (state["args"].num_experts or 0) == spec["num_experts"]
        model.load_state_dict(state["model"], strict=True)
        mcore.say(f"OK legacy {d} rank {dist.get_rank()}: strict load_state_dict, {compare()} tensors equal")
    dist.barrier()


def save_like_megatron(model, common, spec, out, tp, pp, ep, tp_rank, pp_rank, ep_rank):
    from megatron.core import dist_checkpointing
    from megatron.core.enums import ModelType

    args = common["args"]
    for k in ("reshard",):  # Megatron's args only: no reshard record
        common.pop(k, None)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.expert_model_parallel_size, args.expert_tensor_parallel_size = ep, tp
    args.moe_grouped_gemm, args.transformer_impl = False, "local"
    args.model_type = ModelType.encoder_or_decoder
    args.vocab_size = None  # Megatron's args hold only the padded vocab
    args.padded_vocab_size = -(-spec["vocab_size"] // (128 * tp)) * (128 * tp)
    d = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")
    path = os.path.join(out, "legacy", "iter_0000007", d, "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7, "model": model.state_dict()}, path)
    td = os.path.join(out, "torch_dist", "iter_0000007")
    os.makedirs(td, exist_ok=True)
    sharded = model.sharded_state_dict()
    sharded.update(args=args, iteration=7, checkpoint_version=3.0)
    dist_checkpointing.save(sharded, td)
    if dist.get_rank() == 0:
        for kind in ("legacy", "torch_dist"):
            with open(os.path.join(out, kind, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("7")


def main():
    """``CKPT HF_DIR TP PP [EP]``, or ``CKPT HF_DIR tp,pp,ep[,etp] [tp,pp,ep[,etp] ...] [--resave OUT]
    [--legacy ITER_DIR] [--logits]`` (``--legacy``: also strict-load that legacy checkpoint at the first
    layout; ``--logits``: also compare Megatron's logits with transformers' at layouts with PP=1)``
    (several layouts in one process group: Megatron is imported once)."""
    argv = sys.argv[1:]
    opts = {}
    for flag in ("--resave", "--legacy"):
        if flag in argv:
            i = argv.index(flag)
            opts[flag] = argv[i + 1]
            argv = argv[:i] + argv[i + 2:]
    resave, legacy = opts.get("--resave"), opts.get("--legacy")
    logits = "--logits" in argv  # also compare Megatron's forward pass with transformers' (layouts with PP=1)
    argv = [a for a in argv if a != "--logits"]
    ckpt, hf_dir, rest = argv[0], argv[1], argv[2:]
    if "," in rest[0]:
        layouts = [tuple(int(x) for x in r.split(",")) for r in rest]
    else:
        layouts = [(int(rest[0]), int(rest[1]), int(rest[2]) if len(rest) > 2 else 1)]
    procgroup.init_gloo()
    for k, lay in enumerate(layouts):
        tp, pp, ep = lay[:3]
        check_one(ckpt, hf_dir, tp, pp, ep, resave if k == 0 else None, lay[3] if len(lay) > 3 else None,
                  legacy if k == 0 else None, logits)
    procgroup.finish()


if __name__ == "__main__":
    main()
