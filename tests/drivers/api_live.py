"""torchrun script (3 ranks, gloo): :mod:`reshard.api` between live state dicts, no Megatron import.

    torchrun --nproc-per-node 3 tests/drivers/api_live.py LLAMA_HF_DIR MIXTRAL_HF_DIR DEEPSEEK_HF_DIR

The source states are cut by hand from HF tensors saved by transformers (``expected_local``: Megatron-core
names and shards; ``expected_hf_tp``: vLLM's), every received tensor is compared with the same hand-made
expectation at the target layout. One ``OK <case> rank <r>: ...`` line per rank and case.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from reshard import api  # noqa: E402
from reshard.errors import ReshardError  # noqa: E402
from reshard.models import table_for  # noqa: E402
from tests import procgroup  # noqa: E402
from tests.expected import expected_hf_tp, load_hf  # noqa: E402
from tests.referees.check_mcore_load import expected_local  # noqa: E402
from tests.referees.mcore import say  # noqa: E402

F32 = torch.float32


def padded(spec, tp):
    m = 128 * tp
    return -(-spec["vocab_size"] // m) * m


def megatron_state(hf, spec, lay: api.Layout, pos: int):
    """Megatron-core's state_dict() of the rank at ``pos`` of ``lay``, cut by hand (local spec names)."""
    tp, ep = lay.tp, lay.ep
    t, pp = pos % tp, pos // (tp * lay.dp)
    ep_rank = (pos % (tp * lay.dp)) // tp % ep
    pl = api.plan(spec["name"], lay, lay)
    names = [s.name for s in pl.dst_slots[lay.group_ranks[pos]]]
    off = pp * (spec["num_layers"] // lay.pp)
    return {n: expected_local(n, hf, spec, tp, t, off, padded(spec, tp), (ep, ep_rank, tp, t)).to(lay.dtype).clone()
            for n in names}


def padding_bytes(state, spec, tp_rank, itemsize):
    """Bytes of the vocab padding rows in a rank's Megatron shards (copies of the last row, made by the receiver)."""
    out = 0
    for n in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if n in state:
            rows, h = state[n].shape
            out += max(0, min(rows, (tp_rank + 1) * rows - spec["vocab_size"])) * h * itemsize
    return out


def compare(case, got, exp, rank, extra=""):
    got = {k: v for k, v in got.items() if not k.endswith("_extra_state")}
    assert sorted(got) == sorted(exp), (case, rank, sorted(set(got) ^ set(exp))[:6])
    for k, v in got.items():
        e = exp[k].to(v.dtype)
        if v.shape != e.shape or not torch.equal(v, e):
            raise AssertionError(f"{case} rank {rank}: {k} differs ({tuple(v.shape)} vs {tuple(e.shape)})")
    say(f"OK {case} rank {rank}: {len(got)} tensors equal{extra}")


def main():
    llama_dir, mixtral_dir, deepseek_dir = sys.argv[1:4]
    procgroup.init_gloo()
    r = dist.get_rank()
    for hf_dir in (llama_dir, mixtral_dir):
        with open(os.path.join(hf_dir, "config.json")) as f:
            cfg = json.load(f)
        spec = api.model_spec(cfg).to_dict()
        spec["name"] = "tiny_llama3" if cfg["model_type"] == "llama" else "tiny_mixtral"
        hf = load_hf(hf_dir)
        run_family(spec, hf, r)
    virtual_pipeline(load_hf(llama_dir), r)
    round_trip_deepseek(load_hf(deepseek_dir), r)
    subgroup(load_hf(llama_dir), r)
    bad_state(r)
    procgroup.finish()


def run_family(spec, hf, r):
    name, moe = spec["name"], spec["name"] == "tiny_mixtral"
    hf_src = api.Layout(naming="hf", ranks=(0,), dtype=F32)

    # full HF tensors on rank 0 -> Megatron TP=2 on ranks 1, 2 (EP=2 over DP=2 for the MoE), in bf16
    dst = api.Layout(tp=2, ranks=(1, 2), impl="local", dtype=torch.bfloat16) if not moe else \
        api.Layout(tp=1, dp=2, ep=2, ranks=(1, 2), impl="local", dtype=torch.bfloat16)
    stats = {}
    got = api.reshard(api.plan(name, hf_src, dst), hf if r == 0 else None, stats=stats)
    if r == 0:
        assert got is None and stats["bytes_received"] == 0
    else:
        exp = megatron_state(hf, spec, dst, r - 1)
        mine = sum(t.numel() * 2 for t in exp.values()) - padding_bytes(exp, spec, (r - 1) % dst.tp, 2)
        assert stats["bytes_received"] == mine, (stats, mine)  # exactly its shard; padding rows made here
        compare(f"{name} hf->megatron {dst.describe()} bf16", got, exp, r, f", received {mine} bytes = its shard")

    # Megatron TP=1 DP=2 replicas on ranks 1, 2 -> vLLM TP=2 on ranks 0, 1 (fused): the replicas share the sending
    src = api.Layout(tp=1, dp=2, ranks=(1, 2), impl="local", dtype=F32)
    state = megatron_state(hf, spec, src, r - 1) if r in (1, 2) else None
    dst = api.Layout(tp=2, naming="hf_tp", fused=True, ranks=(0, 1), dtype=F32)
    pl = api.plan(name, src, dst)
    stats = {}
    got = api.reshard(pl, state, stats=stats, bucket_mb=0.25)
    sent = [s["send"] for s in pl.rank_bytes(int(0.25 * 2**20))]
    if r in (0, 1):
        compare(f"{name} megatron tp1 dp2 -> hf_tp fused", got, expected_hf_tp(hf, spec, 2, r, fused=True), r,
                f", {stats['rounds']} rounds")
    if r == 2:
        assert stats["bytes_sent"] == sent[2] and sent[0] == 0 and abs(sent[1] - sent[2]) <= 0.25 * max(sent), sent
        say(f"OK {name} replicas share the load rank {r}: bytes sent by ranks 0, 1, 2: {sent}")

    # Megatron TP=2 on ranks 1, 2 -> Megatron TP=1 PP=2 on ranks 0, 1 (partly colocated), into out= in place
    src = api.Layout(tp=2, ranks=(1, 2), impl="local", dtype=F32)
    state = megatron_state(hf, spec, src, r - 1) if r in (1, 2) else None
    dst = api.Layout(tp=1, pp=2, ranks=(0, 1), impl="local", dtype=F32)
    pl = api.plan(name, src, dst)
    out = None
    if r in (0, 1):
        out = {s.name: torch.full(s.shape, -7.0) for s in pl.dst_slots[r]}
        ptrs = {k: v.data_ptr() for k, v in out.items()}
    got = api.reshard(pl, state, out=out)
    if r in (0, 1):
        assert got is out and all(v.data_ptr() == ptrs[k] for k, v in got.items())
        compare(f"{name} megatron tp2 -> tp1 pp2 in place", got, megatron_state(hf, spec, dst, r), r,
                ", same storage")

    # every HF tensor, whole, onto rank 0 only, in small buckets
    stats = {}
    seen = []
    for n, t in api.iter_full(pl, state, ranks=(0,), bucket_mb=0.05, stats=stats):
        assert r == 0 and torch.equal(t, hf[n].to(t.dtype)), n
        seen.append(n)
    if r == 0:
        order = list(table_for(api.model_spec(name)).canonical_names(api.model_spec(name)))
        total = sum(hf[n].numel() * 4 for n in seen)
        assert seen == order and stats["bytes_received"] == total and stats["rounds"] > 3, (stats, total)
        say(f"OK {name} iter_full rank 0: {len(seen)} tensors in HF order, {stats['rounds']} rounds, "
            f"received {total} bytes = the model once")


def virtual_pipeline(hf, r):
    """HF on rank 0 -> Megatron PP=2 VPP=2 on ranks 1, 2 (a list of two chunk state dicts per rank, layers
    interleaved: stage p chunk v holds layer 2v+p) -> HF on rank 0 again."""
    spec = api.model_spec("tiny_llama3").to_dict()
    hf_lay = api.Layout(naming="hf", ranks=(0,), dtype=F32)
    vpp = api.Layout(pp=2, vpp=2, ranks=(1, 2), impl="local", dtype=F32)
    chunks = api.reshard(api.plan("tiny_llama3", hf_lay, vpp), hf if r == 0 else None)
    if r in (1, 2):
        assert isinstance(chunks, list) and len(chunks) == 2
        for v, chunk in enumerate(chunks):
            p = r - 1
            top = {"embedding.word_embeddings.weight": 0, "decoder.final_layernorm.weight": 1,
                   "output_layer.weight": 1}  # first chunk of stage 0, last chunk of the last stage
            for k in chunk:
                assert k not in top or (p, v) == (top[k], top[k]), (k, p, v)
            compare(f"hf -> megatron pp2 vpp2 chunk {v}", chunk,
                    {k: expected_local(k, hf, spec, 1, 0, 2 * v + p, padded(spec, 1))
                     for k in chunk if not k.endswith("_extra_state")}, r)
    back = api.reshard(api.plan("tiny_llama3", vpp, hf_lay), chunks)
    if r == 0:
        compare("megatron pp2 vpp2 -> hf", back, hf, r)


def round_trip_deepseek(hf, r):
    """Multi-latent attention, dense first layer, shared and routed experts: HF on rank 0 -> Megatron TP=2
    (TE names: replicated down-projections) on ranks 1, 2 -> vLLM TP=2 on ranks 0, 1 and HF on rank 2."""
    name = "tiny_deepseek_v3"
    spec = api.model_spec(name).to_dict()
    hf_lay = api.Layout(naming="hf", ranks=(0,), dtype=F32)
    mg = api.Layout(tp=2, ranks=(1, 2), dtype=F32)
    state = api.reshard(api.plan(name, hf_lay, mg), hf if r == 0 else None)
    if r in (1, 2):
        q_down = state["decoder.layers.0.self_attention.linear_q_down_proj.weight"]
        assert torch.equal(q_down, hf["model.layers.0.self_attn.q_a_proj.weight"])  # whole on each TP rank
    got = api.reshard(api.plan(name, mg, api.Layout(tp=2, naming="hf_tp", ranks=(0, 1), dtype=F32)), state)
    if r in (0, 1):
        compare(f"{name} hf -> megatron tp2 -> hf_tp tp2", got, expected_hf_tp(hf, spec, 2, r), r)
    back = api.reshard(api.plan(name, mg, api.Layout(naming="hf", ranks=(2,), dtype=F32)), state)
    if r == 2:
        compare(f"{name} hf -> megatron tp2 -> hf", back, hf, r)


def subgroup(hf, r):
    """A plan over a subgroup (global ranks 1, 2 as group ranks 0, 1): global rank 0 takes no part."""
    group = dist.new_group([1, 2])
    if r == 0:
        return
    spec = api.model_spec("tiny_llama3").to_dict()
    pl = api.plan("tiny_llama3", api.Layout(naming="hf", ranks=(0,), dtype=F32),
                  api.Layout(tp=1, ranks=(1,), impl="local", dtype=F32))
    stats = {}
    got = api.reshard(pl, hf if r == 1 else None, group=group, stats=stats)
    if r == 2:
        compare("subgroup [1, 2]: hf on group rank 0 -> megatron on group rank 1", got,
                megatron_state(hf, spec, api.Layout(tp=1, impl="local", dtype=F32), 0), r,
                f", received {stats['bytes_received']} bytes")


def bad_state(r):
    """A state that does not match the plan fails on every rank, naming its tensors, before any byte moves."""
    src = api.Layout(tp=2, ranks=(1, 2), impl="local", dtype=F32)
    dst = api.Layout(tp=1, ranks=(0,), impl="local", dtype=F32)
    pl = api.plan("tiny_llama3", src, dst)
    state = None
    if r in (1, 2):
        state = {s.name: torch.zeros(s.shape) for s in pl.src_slots[r]}
        if r == 1:
            del state["decoder.layers.1.mlp.linear_fc2.weight"]
            state["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.zeros(3, 3)
    out = {s.name: torch.full(s.shape, -7.0) for s in pl.dst_slots[0]} if r == 0 else None
    try:
        api.reshard(pl, state, out=out)
    except ReshardError as e:
        msg = str(e)
        assert "decoder.layers.1.mlp.linear_fc2.weight" in msg and "linear_qkv.weight is (3, 3)" in msg, msg
        assert out is None or all(bool((v == -7).all()) for v in out.values())
        say(f"OK bad state rank {r}: {type(e).__name__}: {msg[:160]}")
        return
    raise AssertionError("a mismatched state was accepted")


if __name__ == "__main__":
    main()
