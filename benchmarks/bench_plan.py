"""Planning at scale: the whole plan for a Llama-3.1-405B index (synthetic metadata, no data)
at 1,024 simulated ranks into TP=8 PP=16, on one process - time and memory.

    python benchmarks/bench_plan.py [--preset llama3.1_405b] [--world 1024] [--tp 8] [--pp 16] [--files 191]
                                    [--first 7 --last 7]
    python benchmarks/bench_plan.py --moe     # the Qwen3-235B-A22B index (94 layers, 128 experts) into
                                              # TP=4 PP=8 EP=32
    python benchmarks/bench_plan.py --deepseek  # the DeepSeek-V3 (671B) index: per-layer keys (3 dense
                                                # layers, then MoE), 256 experts, into TP=8 PP=16 EP=64
    python benchmarks/bench_plan.py --training --dry-run
                                    # a Llama-3-70B training checkpoint (bf16 weights + fp32 master weights
                                    # and Adam moments, as optimizer shadows) into torch_dist TP=8 PP=8 at
                                    # 512 simulated ranks: the dry-run figures of issue 12
"""

import argparse
import math
import os
import sys
import time
import tracemalloc

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from reshard.formats import torch_dist  # noqa: E402
from reshard.layout import Layout  # noqa: E402
from reshard.models import table_for  # noqa: E402
from reshard.plan import build_plan, check_coverage  # noqa: E402
from reshard.progress import peak_rss_mb  # noqa: E402
from reshard.synthetic import fake_hf_index, load_preset  # noqa: E402


def add_optimizer_state(index, kinds, files: int) -> None:
    """The optimizer state of a training checkpoint as shadow tensors (reshard/optim.py): per weight, an fp32
    master weight and two Adam moments of its shape, stored in ``files`` further files."""
    from reshard import optim
    from reshard.formats.base import SourceSlice, StoredTensor

    names = sorted(n for n in index.shapes if not optim.is_shadow(n))
    total = sum(4 * math.prod(index.shapes[n]) for n in names) * len(kinds)
    offs, acc = [0] * files, 0
    for kind in kinds:
        for n in names:
            shape = index.shapes[n]
            f = min(files - 1, acc * files // total)
            st = StoredTensor(f"optim-{f:05d}.distcp", f"optimizer.state.{kind}.{n}", shape, torch.float32, offs[f])
            offs[f] += st.nbytes
            acc += st.nbytes
            zero = (0,) * len(shape)
            name = optim.shadow(kind, n)
            index.slices[name] = [SourceSlice(st, zero, zero, shape)]
            index.shapes[name], index.dtypes[name] = shape, torch.float32
    index.files.update({f"optim-{f:05d}.distcp": offs[f] for f in range(files)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3.1_405b")
    ap.add_argument("--world", type=int, default=1024)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=16)
    ap.add_argument("--files", type=int, default=191)
    # 126 layers on 16 stages: 7 on the first and last, 8 on each of the 14 others
    ap.add_argument("--first", type=int, default=7)
    ap.add_argument("--last", type=int, default=7)
    ap.add_argument("--buffer-mb", type=int, default=512)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--moe", action="store_true",
                    help="Qwen3-235B-shaped MoE index into TP=4 PP=8 EP=32 (first/last stage 11/11 layers)")
    ap.add_argument("--deepseek", action="store_true",
                    help="DeepSeek-V3 index into TP=8 PP=16 EP=64 (first/last stage 3/2 layers)")
    ap.add_argument("--dry-run", action="store_true", help="also print the dry-run report of this plan")
    ap.add_argument("--training", action="store_true",
                    help="Llama-3-70B with its optimizer state (3 fp32 shadows per weight) into TP=8 PP=8, 512 ranks")
    a = ap.parse_args()
    if a.moe:  # 94 layers on 8 stages: 11 on the first and last, 12 on each of the 6 others
        a.preset, a.tp, a.pp, a.ep, a.first, a.last, a.files = "qwen3_235b_a22b", 4, 8, 32, 11, 11, 118
    if a.deepseek:  # 61 layers on 16 stages: 3 on the first, 2 on the last, 4 on each of the 14 others
        a.preset, a.tp, a.pp, a.ep, a.first, a.last, a.files = "deepseek_v3", 8, 16, 64, 3, 2, 163
    if a.training:  # 80 layers on 8 stages, 10 each
        a.preset, a.tp, a.pp, a.world, a.first, a.last, a.files = "llama3_70b", 8, 8, 512, None, None, 64
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    spec = load_preset(a.preset)
    index = fake_hf_index(spec, a.files)
    kinds = ("param", "exp_avg", "exp_avg_sq") if a.training else ()
    if kinds:
        add_optimizer_state(index, kinds, a.files * 3)
    index_s = time.perf_counter() - t0
    layout = Layout(tp=a.tp, pp=a.pp, ep=a.ep, first_stage_layers=a.first, last_stage_layers=a.last)
    layout.check(spec)

    def plan_once():
        tgts = torch_dist.targets(spec, layout, table_for(spec), lambda n: index.dtypes[n])
        tgts += torch_dist.optimizer_targets(tgts, kinds, lambda n: index.dtypes[n])
        return build_plan(index, tgts, a.world, buffer_bytes=a.buffer_mb << 20)

    t0 = time.perf_counter()
    plan = plan_once()
    took = time.perf_counter() - t0
    del plan
    # Allocations are measured in a second, untimed pass (tracemalloc slows Python several-fold).
    tracemalloc.start()
    plan = plan_once()
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t1 = time.perf_counter()
    problems = check_coverage(plan, index.shapes)
    coverage_s = time.perf_counter() - t1
    assert not problems, problems[:5]
    reads = [s["read"] for s in plan.rank_stats()]
    mean = sum(reads) / len(reads)
    moe = f", {spec.num_experts} experts" if spec.num_experts else ""
    print(f"{a.preset} ({spec.num_layers} layers{moe}; {index.total_bytes / 1e9:.1f} GB in {a.files} files, "
          f"{len(index.shapes)} tensors) -> torch_dist tp={a.tp} pp={a.pp} ep={a.ep} "
          f"(first/last stage {a.first}/{a.last} layers) on {a.world} simulated ranks")
    print(f"synthetic index (the metadata a reader would return): {index_s:.2f} s")
    print(f"plan (targets + pieces + readers + rounds): {took:.2f} s, {len(plan.pieces)} pieces "
          f"(max {plan.max_piece_bytes / 2**20:.0f} MiB), "
          f"{plan.num_rounds} exchange round(s)")
    print(f"memory: Python allocations peak {py_peak / 2**20:.1f} MiB while planning; "
          f"process RSS {peak_rss_mb():.0f} MB "
          f"({peak_rss_mb() - rss0:.0f} MB above the interpreter with torch)")
    print(f"read balance: max/mean {max(reads) / mean:.3f}, min/mean {min(reads) / mean:.3f}; "
          f"idle ranks {sum(r == 0 for r in reads)}")
    print(f"coverage check (every target element once, every source element used): {coverage_s:.2f} s")
    if a.dry_run:
        from reshard import dryrun

        print(dryrun.format_text(dryrun.report(plan, file_based=False)))


if __name__ == "__main__":
    main()
