"""torchrun script (4 ranks, gloo): :mod:`reshard.api` on the state dicts of real Megatron-core GPTModels.

    torchrun --nproc-per-node 4 tests/referees/mcore_live.py HF_DIR TORCH_DIST [HF_DIR TORCH_DIST ...]

Megatron-core (local spec, CPU) loads the HF model, converted to torch_dist by reshard, with its own
``dist_checkpointing.load`` at TP=2 PP=2 (and again at TP=2 PP=1, DP=2); its ``state_dict()`` on every rank is the
source. Targets: Megatron TP=4 (strictly loaded into a TP=4 GPTModel, whose logits must equal
transformers', then refilled in place), Megatron TP=1 PP=4, vLLM's hf_tp at TP=4 (plain and fused,
colocated) and hf_tp TP=2 on ranks 2, 3 from a source on ranks 0, 1. Every received tensor is compared
with the HF tensors cut by hand. One ``OK ...`` line per rank and case.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from reshard import api  # noqa: E402
from tests import procgroup  # noqa: E402
from tests.expected import expected_hf_tp, load_hf  # noqa: E402
from tests.referees import mcore  # noqa: E402
from tests.referees.check_mcore_load import check_logits, expected_local  # noqa: E402

F32 = torch.float32


def padded(spec, tp):
    return -(-spec["vocab_size"] // (128 * tp)) * (128 * tp)


def megatron_source(spec, ckpt, tp, pp):
    """The state_dict() of a GPTModel that Megatron-core loaded from ``ckpt`` at TP/PP (the model is dropped)."""
    model = mcore.build_gpt(spec, tp, pp, padded(spec, tp))
    mcore.load_torch_dist(model, ckpt)
    return dict(model.state_dict())


def compare(case, got, exp_of, r):
    n = 0
    for k, v in got.items():
        if k.endswith("_extra_state"):
            continue
        e = exp_of(k)
        if v.shape != e.shape or not torch.equal(v, e.to(v.dtype)):
            raise AssertionError(f"{case} rank {r}: {k} differs ({tuple(v.shape)} vs {tuple(e.shape)})")
        n += 1
    assert n > 0
    mcore.say(f"OK {case} rank {r}: {n} tensors equal")


def to_tp4(spec, hf, hf_dir, src, plan_src, r):
    """TP=2 PP=2 -> Megatron TP=4: strict load_state_dict into a TP=4 GPTModel, logits; then out= in place."""
    from megatron.core import parallel_state as ps

    dst = api.Layout(tp=4, impl="local", dtype=F32)
    pl = api.plan(spec["name"], plan_src, dst)
    stats = {}
    got = api.reshard(pl, src, stats=stats)
    exp = lambda k: expected_local(k, hf, spec, 4, r, 0, padded(spec, 4))  # noqa: E731
    compare(f"{spec['name']} megatron tp2 pp2 -> tp4", got, exp, r)
    model = mcore.build_gpt(spec, 4, 1, padded(spec, 4))
    model.load_state_dict(got, strict=True)
    mcore.say(f"OK {spec['name']} tp4 rank {r}: GPTModel.load_state_dict(strict=True), received "
              f"{stats['bytes_received']} bytes, sent {stats['bytes_sent']}")
    check_logits(model, hf_dir, spec, ps.get_tensor_model_parallel_rank())
    # refill the live model in place: its parameters keep their storage and get the weights back
    params = dict(model.named_parameters())
    ptrs = {k: p.data_ptr() for k, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.zero_()
    out = model.state_dict()
    assert api.reshard(pl, src, out=out) is out
    assert all(p.data_ptr() == ptrs[k] for k, p in model.named_parameters())
    compare(f"{spec['name']} megatron tp2 pp2 -> tp4 in place (same storage)", dict(model.state_dict()), exp, r)
    check_logits(model, hf_dir, spec, ps.get_tensor_model_parallel_rank())
    del model, params, out


def run(hf_dir, ckpt):
    r = dist.get_rank()
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    spec = api.model_spec(cfg).to_dict()
    spec["name"] = "tiny_llama3" if cfg["model_type"] == "llama" else "tiny_mixtral"
    name = spec["name"]
    hf = load_hf(hf_dir)
    src = megatron_source(spec, ckpt, 2, 2)
    plan_src = api.Layout(tp=2, pp=2, impl="local", dtype=F32)
    to_tp4(spec, hf, hf_dir, src, plan_src, r)

    dst = api.Layout(tp=1, pp=4, impl="local", dtype=F32)
    got = api.reshard(api.plan(name, plan_src, dst), src)
    compare(f"{name} megatron tp2 pp2 -> tp1 pp4", got,
            lambda k: expected_local(k, hf, spec, 1, 0, r, padded(spec, 1)), r)

    for fused in (False, True):
        dst = api.Layout(tp=4, naming="hf_tp", fused=fused, dtype=F32)
        got = api.reshard(api.plan(name, plan_src, dst), src)
        exp = expected_hf_tp(hf, spec, 4, r, fused=fused)
        assert sorted(got) == sorted(exp), sorted(set(got) ^ set(exp))[:5]
        compare(f"{name} megatron tp2 pp2 -> hf_tp tp4" + (" fused" if fused else ""), got, exp.__getitem__, r)

    # disjoint: the trainer on ranks 0, 1 (TP=2, Megatron's other DP replica on 2, 3 is not used), the engine on 2, 3
    src = megatron_source(spec, ckpt, 2, 1)
    trainer = api.Layout(tp=2, ranks=(0, 1), impl="local", dtype=F32)
    engine = api.Layout(tp=2, naming="hf_tp", fused=True, ranks=(2, 3), dtype=F32)
    pl = api.plan(name, trainer, engine)
    stats = {}
    got = api.reshard(pl, src if r < 2 else None, stats=stats)
    if r >= 2:
        exp = expected_hf_tp(hf, spec, 2, r - 2, fused=True)
        assert sorted(got) == sorted(exp)
        real = sum(t.numel() * 4 for t in exp.values()) - pad_bytes(exp, spec)
        assert stats["bytes_received"] == real and stats["bytes_sent"] == 0, (stats, real)
        compare(f"{name} megatron tp2 on ranks 0,1 -> hf_tp tp2 on ranks 2,3 (received {real} bytes = its shard)",
                got, exp.__getitem__, r)
    else:
        assert got is None and stats["bytes_received"] == 0


def pad_bytes(exp, spec):
    return sum(int((t == 0).all(dim=1).sum()) * t.shape[1] * 4 for n, t in exp.items()
               if n in ("model.embed_tokens.weight", "lm_head.weight"))


def main():
    procgroup.init_gloo()
    args = sys.argv[1:]
    for k in range(0, len(args), 2):
        run(*args[k:k + 2])
    procgroup.finish()


if __name__ == "__main__":
    main()
