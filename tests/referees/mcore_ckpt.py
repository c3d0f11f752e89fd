"""torchrun script: Megatron-core makes and checks Megatron checkpoints (FORMATS.md §6).

    make   SPEC_JSON OUT TP PP VPP   a random GPTModel (local spec) at TP/PP/VPP, saved the way
                                     Megatron saves it: legacy files (``state_dict()`` per rank,
                                     ``args`` with a Megatron enum, RNG state with numpy objects)
                                     under OUT/legacy, and ``dist_checkpointing.save`` under
                                     OUT/torch_dist (Megatron's own torch_dist writer)
    check  SPEC_JSON REF KIND:CKPT:TP:PP:VPP [KIND:CKPT:TP:PP:VPP ...]
                                     for each job (in one process group; data parallel fills the
                                     ranks a layout does not use):
                                     build the model at TP/PP/VPP; load CKPT (KIND = legacy: strict
                                     ``load_state_dict`` of this rank's file; torch_dist:
                                     ``dist_checkpointing.load``); load REF (Megatron's own torch_dist)
                                     with ``dist_checkpointing.load`` into a second model - Megatron
                                     reshards it itself - and compare every tensor (vocab rows past
                                     the true vocab excluded: padding is not data).

VPP = 0 means no virtual pipeline. Prints ``OK job k rank r tp t pp p: n tensors equal`` per rank.
"""

import json
import os
import sys
import warnings
from argparse import Namespace

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from tests import procgroup  # noqa: E402
from tests.referees import mcore  # noqa: E402


def padded_vocab(spec, tp):
    m = 128 * tp
    return -(-spec["vocab_size"] // m) * m


def build(spec, tp, pp, vpp, padded):
    """Model chunks of this rank (one per virtual stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    mcore.patch_cuda_for_cpu()
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp or None)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    cfg = mcore.transformer_config(spec, tp, pp)
    if vpp:
        cfg.virtual_pipeline_model_parallel_size = vpp
    chunks = []
    for v in range(vpp or 1):
        vs = v if vpp else None
        with warnings.catch_warnings(), mcore.tensor_cuda_is_identity():
            warnings.simplefilter("ignore")
            chunks.append(GPTModel(
                config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=False),
                vocab_size=padded, max_sequence_length=spec.get("max_position_embeddings", 4096),
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vs),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vs),
                share_embeddings_and_output_weights=spec.get("tie_word_embeddings", False),
                position_embedding_type="rope", rotary_base=int(spec.get("rope_theta", 10000)),
                vp_stage=vs,
            ))
    return chunks


def megatron_args(spec, tp, pp, vpp, padded):
    from megatron.core.enums import ModelType

    return Namespace(
        num_layers=spec["num_layers"], hidden_size=spec["hidden_size"], ffn_hidden_size=spec["ffn_hidden_size"],
        num_attention_heads=spec["num_attention_heads"], num_query_groups=spec["num_query_groups"],
        group_query_attention=spec["num_query_groups"] != spec["num_attention_heads"],
        kv_channels=spec["head_dim"], padded_vocab_size=padded, make_vocab_size_divisible_by=128,
        swiglu=True, normalization="RMSNorm", norm_epsilon=spec["norm_eps"], add_bias_linear=False,
        add_qkv_bias=spec["qkv_bias"], untie_embeddings_and_output_weights=not spec["tie_word_embeddings"],
        position_embedding_type="rope", rotary_base=int(spec["rope_theta"]), max_position_embeddings=4096,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp or None, transformer_impl="local", params_dtype=torch.float32,
        bf16=False, fp16=False, model_type=ModelType.encoder_or_decoder, iteration=100, ckpt_format="torch",
    )


ITERATION = 100
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


def rank_dir(t, p, pp):
    return f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")


def rng_state():
    """RNG state as Megatron saves it (numpy objects included: a reader must not run them)."""
    return [{"random_rng_state": None, "np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}]


def save_both(out, d, state, sharded):
    """This rank's legacy file ``OUT/legacy/iter_0000100/<d>/model_optim_rng.pt`` (``state``) and its part
    of Megatron's own ``dist_checkpointing.save`` of ``sharded`` under OUT/torch_dist; then the trackers."""
    from megatron.core import dist_checkpointing

    it = f"iter_{ITERATION:07d}"
    path = os.path.join(out, "legacy", it, d, "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    td = os.path.join(out, "torch_dist", it)
    os.makedirs(td, exist_ok=True)
    dist_checkpointing.save(sharded, td)
    if dist.get_rank() == 0:
        for kind in ("legacy", "torch_dist"):
            with open(os.path.join(out, kind, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(ITERATION))
    dist.barrier()


def load_rank_file(ckpt, d):
    return torch.load(os.path.join(iter_dir(ckpt), d, "model_optim_rng.pt"), weights_only=False)


def count_equal(sa, sb, real, where):
    """Every tensor of two state dicts equal (``_extra_state`` skipped; vocab rows from ``real`` on are
    padding, not data); returns how many."""
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    n = 0
    for k in sa:
        if k.endswith("_extra_state"):
            continue
        x, y = sa[k], sb[k]
        if k in VOCAB_KEYS:
            x, y = x[:real], y[:real]
        if x.shape != y.shape or not torch.equal(x, y):
            raise AssertionError(f"{where}: {k} differs")
        n += 1
    return n


def make(spec, out, tp, pp, vpp):
    from megatron.core import parallel_state as ps

    padded = padded_vocab(spec, tp)
    torch.manual_seed(1234)
    chunks = build(spec, tp, pp, vpp, padded)
    # Norms at 1.0 would hide a norm/norm swap. Replicated tensors stay equal across TP ranks,
    # as in a real run: the perturbation depends on the pipeline rank only.
    torch.manual_seed(1000 + ps.get_pipeline_model_parallel_rank())
    with torch.no_grad():
        for m in chunks:
            for name, p in m.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
    d = rank_dir(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), pp)
    args = megatron_args(spec, tp, pp, vpp, padded)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, "rng_state": rng_state()}
    if vpp:
        for v, m in enumerate(chunks):
            state[f"model{v}"] = m.state_dict()
    else:
        state["model"] = chunks[0].state_dict()
    # Megatron's own torch_dist writer, from the same weights.
    sharded = {f"model{v}": m.sharded_state_dict() for v, m in enumerate(chunks)}
    sharded.update(args=args, iteration=ITERATION, checkpoint_version=3.0)
    save_both(out, d, state, sharded)
    mcore.rank_print(f"made {d}")


def load_ref(chunks, ref):
    from megatron.core import dist_checkpointing

    sharded = {f"model{v}": m.sharded_state_dict() for v, m in enumerate(chunks)}
    state = dist_checkpointing.load(sharded, ref)
    for v, m in enumerate(chunks):
        m.load_state_dict(state[f"model{v}"], strict=True)


def iter_dir(ckpt):
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        it = f.read().strip()
    return os.path.join(ckpt, "release" if it == "release" else f"iter_{int(it):07d}")


def check(spec, ref, kind, ckpt, tp, pp, vpp, job=0):
    from megatron.core import parallel_state as ps

    padded = padded_vocab(spec, tp)
    got = build(spec, tp, pp, vpp, padded)
    t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if kind == "legacy":
        state = load_rank_file(ckpt, rank_dir(t, p, pp))
        assert state["args"].tensor_model_parallel_size == tp and state["args"].pipeline_model_parallel_size == pp
        assert state["args"].padded_vocab_size == padded
        for v, m in enumerate(got):
            m.load_state_dict(state[f"model{v}" if vpp else "model"], strict=True)
    else:
        load_ref(got, iter_dir(ckpt))
    want = build(spec, tp, pp, vpp, padded)
    load_ref(want, iter_dir(ref))
    rows = padded // tp
    real = max(0, min(rows, spec["vocab_size"] - t * rows))
    n = sum(count_equal(a.state_dict(), b.state_dict(), real, f"rank {dist.get_rank()} (tp {t} pp {p} chunk {v})")
            for v, (a, b) in enumerate(zip(got, want)))
    assert n > 0
    mcore.say(f"OK job {job} rank {dist.get_rank()} tp {t} pp {p}: {n} tensors equal")


def main():
    procgroup.init_gloo()
    mode = sys.argv[1]
    with open(sys.argv[2]) as f:
        spec = json.load(f)
    if mode == "make":
        make(spec, sys.argv[3], *map(int, sys.argv[4:7]))
    else:
        for k, item in enumerate(sys.argv[4:]):
            kind, ckpt, tp, pp, vpp = item.split(":")
            check(spec, sys.argv[3], kind, ckpt, int(tp), int(pp), int(vpp), job=k)
            dist.barrier()
    dist.barrier()
    procgroup.finish()


if __name__ == "__main__":
    main()
