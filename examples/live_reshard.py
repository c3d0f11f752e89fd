"""Refresh an inference engine's weights from a trainer's, in memory, shard to shard (reshard.api).

    torchrun --nproc-per-node 4 examples/live_reshard.py                  # CPU, gloo
    torchrun --nproc-per-node 4 examples/live_reshard.py --device cuda    # GPUs, NCCL (one GPU per rank)
    torchrun --nproc-per-node 2 examples/live_reshard.py --layouts small  # trainer TP=1 PP=2 -> engine TP=2

A tiny Llama-3-style model: random HF weights on rank 0 are loaded into a Megatron trainer layout
(TP=2 PP=2, Megatron-core's state_dict() names), then the trainer's shards refill an engine's parameters
(vLLM's names and TP=4 slices, fused qkv_proj / gate_up_proj) in place. Each rank checks its engine
shard against the HF weights and prints what it received and a checksum.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from reshard import api
from reshard.models import table_for


def hf_weights(spec, dtype):
    """Random HF tensors of the spec, the same on every rank that makes them."""
    gen = torch.Generator().manual_seed(0)
    names = table_for(spec).canonical_names(spec)
    return {n: torch.randn(e.part_shape(spec, role), generator=gen).to(dtype) for n, (e, role, _) in names.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny_llama3")
    ap.add_argument("--layouts", default="default", choices=("default", "small"))
    a = ap.parse_args()
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, dev = dist.get_rank(), torch.device("cuda" if cuda else "cpu", torch.cuda.current_device() if cuda else None)
    spec, dtype = api.model_spec(a.preset), torch.bfloat16

    hf = {k: v.to(dev) for k, v in hf_weights(spec, dtype).items()}
    full = api.Layout(naming="hf", ranks=(0,), dtype=dtype)
    tp, pp, etp = (2, 2, 4) if a.layouts == "default" else (1, 2, 2)
    trainer = api.Layout(tp=tp, pp=pp, dtype=dtype)  # Megatron-core names (Transformer Engine spec)
    engine = api.Layout(tp=etp, naming="hf_tp", fused=True, dtype=dtype)

    # the trainer's shards, loaded from the HF weights on rank 0 (plans are pure: build once, reuse)
    state = api.reshard(api.plan(spec, full, trainer), hf if rank == 0 else None)

    # the engine's live parameters, refilled in place after a training step
    refresh = api.plan(spec, trainer, engine)
    params = {s.name: torch.zeros(s.shape, dtype=dtype, device=dev) for s in refresh.dst_slots[rank]}
    stats = {}
    api.reshard(refresh, state, out=params, stats=stats)

    expect = api.reshard(api.plan(spec, full, engine), hf if rank == 0 else None)  # the same shards cut straight from the HF weights
    assert all(torch.equal(params[k], expect[k]) for k in params), "engine shard differs from the HF weights"
    checksum = sum(float(t.double().sum()) * (i + 1) for i, (_, t) in enumerate(sorted(params.items())))
    shard = sum(t.numel() * t.element_size() for t in params.values())
    # one write per line: the ranks share stdout, and print()'s text and newline can be split by another rank's line
    sys.stdout.write(f"rank {rank}: {len(params)} engine tensors equal to the HF weights; received "
                     f"{stats['bytes_received']} bytes, {stats['bytes_local']} copied locally (its shard: {shard} "
                     f"bytes); checksum {checksum:.6e}\n")
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
