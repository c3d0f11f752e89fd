"""Live resharding (reshard.api) against the full-gather-then-slice pattern, in one run.

    python benchmarks/bench_api.py [--gb 1.0] [--nproc 4] [--bucket-mb 256]

A synthetic Llama-3-style model of about ``--gb`` GB (bf16) held as a Megatron trainer's state dicts at
TP=2 PP=2 on 4 ranks (gloo, CPU) is resharded to TP=4 PP=1 twice, each in its own torchrun so that the
peak memory is its own:

- ``api``: ``reshard.api.reshard`` - each rank receives only the rectangles of its TP=4 shard it lacks;
- ``gather``: what the weight-sync tools do (Megatron-Bridge ``export_hf_weights``, veRL, SGLang): per
  tensor, all-gather the TP shards into the full tensor, broadcast it from its pipeline stage to every
  rank, then each rank slices its TP=4 shard out of it.

Both results are checksummed per rank and must agree. Printed: seconds (best of ``--repeat``), bytes
sent and received per rank, the rank's shard, peak RSS per rank, and the ratios.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from reshard import api  # noqa: E402
from reshard.synthetic import load_preset, scaled  # noqa: E402

BF16 = torch.bfloat16


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def source_state(pl: api.Plan, rank: int):
    """This rank's TP=2 PP=2 shards, pseudo-random; identical replicas (norms on both TP ranks) equal."""
    slots, holders = api._groups(pl.src_slots)
    out = {}
    for g, (s, who) in enumerate(zip(slots, holders)):
        if rank in who:
            gen = torch.Generator().manual_seed(g)
            out[s.name] = torch.randn(s.shape, generator=gen, dtype=torch.float32).to(BF16)
    return out


def checksum(state) -> float:
    return float(sum(t.double().sum().item() * (i + 1) for i, (_, t) in enumerate(sorted(state.items()))))


# ------------------------------------------------------------------ the baseline: gather, broadcast, slice

def _full_megatron(e, shards, tp):
    """The TP=1 Megatron tensor from its TP shards (the per-rule ladder every gather-based tool has)."""
    if e.tp_rule == "row":
        return torch.cat(shards, dim=1)
    if e.tp_rule == "gated":
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if e.tp_rule in ("column", "vocab", "qkv"):
        return torch.cat(shards)
    return shards[0]


def _tp_shard(e, full, tp, t, vocab, padded):
    if e.tp_rule == "row":
        return full.chunk(tp, dim=1)[t]
    if e.tp_rule == "gated":
        g, u = full.chunk(2)
        return torch.cat([g.chunk(tp)[t], u.chunk(tp)[t]])
    if e.tp_rule == "vocab":  # re-padded for the new TP by repeating the last real row
        full = full[:vocab]
        full = torch.cat([full, full[-1:].expand(padded - vocab, -1)])
    if e.tp_rule in ("column", "vocab", "qkv"):
        return full.chunk(tp)[t]
    return full


def gather_then_slice(spec, src_lay, dst_lay, state, rank, stats):
    """Every tensor made whole on every rank, then sliced."""
    from reshard.formats import megatron as mg
    from reshard.formats import megatron_legacy as legacy
    from reshard.models import table_for

    table, el, dl = table_for(spec), src_lay.parallel(), dst_lay.parallel()
    tp, pp = src_lay.tp, rank // src_lay.tp
    tp_groups = [dist.new_group([p * tp + k for k in range(tp)]) for p in range(src_lay.pp)]
    padded = dl.padded_vocab(spec.vocab_size)
    out = {}
    want = {s.name for s in api.rank_slots(spec, dst_lay, table, rank)}
    for stage in range(src_lay.pp):  # the tensors of each stage, in the same order on every rank
        items = legacy.rank_items(spec, el, table, stage, 0, 0, src_lay.impl, tied_copy=False)
        offset = el.stage_layers(spec.num_layers)[stage][0][0]
        for e, i, name in items:
            local = mg.local_shape(e, spec, el)
            if stage == pp:
                shard = state[name]
                if e.tp_rule != "replicated":
                    parts = [torch.empty_like(shard) for _ in range(tp)]
                    dist.all_gather(parts, shard, group=tp_groups[stage])
                    stats["bytes_received"] += (tp - 1) * shard.numel() * 2
                    stats["bytes_sent"] += shard.numel() * 2
                    full = _full_megatron(e, parts, tp)
                else:
                    full = shard
            else:
                rows = local[0] * tp if e.tp_rule in ("column", "vocab", "qkv", "gated") else local[0]
                cols = local[1] * tp if e.tp_rule == "row" else (local[1] if len(local) > 1 else None)
                full = torch.empty((rows, cols) if cols is not None else (rows,), dtype=BF16)
            dist.broadcast(full, src=stage * tp)  # from the stage's first TP rank to every rank
            if rank == stage * tp:
                stats["bytes_sent"] += full.numel() * 2 * (dist.get_world_size() - 1)
            else:
                stats["bytes_received"] += full.numel() * 2
            gname = name if i is None else name.replace(f"decoder.layers.{i - offset}.", f"decoder.layers.{i}.")
            if gname in want:
                out[gname] = _tp_shard(e, full, dst_lay.tp, rank, spec.vocab_size, padded).clone()
            del full
    return out


# ------------------------------------------------------------------------------------------- one rank

def worker(args):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = scaled(load_preset("tiny_llama3"), args.gb, BF16)
    src_lay = api.Layout(tp=2, pp=2, dtype=BF16)
    dst_lay = api.Layout(tp=4, dtype=BF16)
    pl = api.plan(spec, src_lay, dst_lay)
    state = source_state(pl, rank)
    shard = sum(2 * torch.Size(s.shape).numel() for s in pl.dst_slots[rank])
    base = rss_mb()
    times, result = [], None
    for _ in range(args.repeat):
        stats = {"bytes_sent": 0, "bytes_received": 0}
        result = None
        dist.barrier()
        t0 = time.perf_counter()
        if args.mode == "api":
            result = api.reshard(pl, state, bucket_mb=args.bucket_mb, stats=stats)
        else:
            result = gather_then_slice(spec, src_lay, dst_lay, state, rank, stats)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = {k: v for k, v in result.items() if isinstance(v, torch.Tensor)}
    row = dict(rank=rank, seconds=min(times), all=times, sent=stats["bytes_sent"], received=stats["bytes_received"],
               shard=shard, source=sum(v.numel() * 2 for v in state.values()), rss_before=base, peak_rss=peak,
               checksum=checksum(weights), model=sum(p * 2 for p in (torch.Size(s).numel() for s in pl.index.shapes.values())))
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run(mode, args, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           os.path.abspath(__file__), "--worker", "--mode", mode, "--gb", str(args.gb), "--repeat", str(args.repeat),
           "--bucket-mb", str(args.bucket_mb), "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(os.path.dirname(__file__), os.pardir))
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--mode", default="api")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        res = {m: run(m, args, os.path.join(tmp, f"{m}.json")) for m in ("api", "gather")}
    a, g = res["api"], res["gather"]
    print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}; {args.nproc} ranks (gloo); model "
          f"{a[0]['model'] / 1e9:.2f} GB bf16; trainer TP=2 PP=2 -> TP=4 PP=1; bucket {args.bucket_mb:g} MB")
    print(f"{'':>8} {'rank':>4} {'seconds':>8} {'sent MB':>9} {'recv MB':>9} {'shard MB':>9} {'peak RSS MB':>12}"
          f" {'RSS before':>11}")
    for mode, rows in res.items():
        for r in rows:
            print(f"{mode:>8} {r['rank']:>4} {r['seconds']:>8.2f} {r['sent'] / 2**20:>9.1f} {r['received'] / 2**20:>9.1f}"
                  f" {r['shard'] / 2**20:>9.1f} {r['peak_rss']:>12.0f} {r['rss_before']:>11.0f}")
    same = all(x["checksum"] == y["checksum"] for x, y in zip(a, g))
    speed = max(r["seconds"] for r in g) / max(r["seconds"] for r in a)
    recv_ratio = max(r["received"] / r["shard"] for r in a)
    print(f"results equal (per-rank checksums): {same}")
    print(f"speed-up api / gather-then-slice: {speed:.2f}x (goal >= 2x: {'ok' if speed >= 2 else 'MISSED'})")
    print(f"bytes received per rank / its shard: api {recv_ratio:.2f} (goal <= 1: {'ok' if recv_ratio <= 1 else 'MISSED'}),"
          f" gather {max(r['received'] / r['shard'] for r in g):.2f}")
    print(f"peak RSS above the start, max over ranks: api {max(r['peak_rss'] - r['rss_before'] for r in a):.0f} MB, "
          f"gather {max(r['peak_rss'] - r['rss_before'] for r in g):.0f} MB")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
