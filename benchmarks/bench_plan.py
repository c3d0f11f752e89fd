"""Planning at scale: the whole plan for a Llama-3.1-405B index (synthetic metadata, no data)
at 1,024 simulated ranks into TP=8 PP=16, on one process - time and memory.

    python benchmarks/bench_plan.py [--preset llama3.1_405b] [--world 1024] [--tp 8] [--pp 16] [--files 191]
                                    [--first 7 --last 7]
"""

import argparse
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from reshard.formats import torch_dist  # noqa: E402
from reshard.layout import Layout  # noqa: E402
from reshard.models import table_for  # noqa: E402
from reshard.plan import build_plan, check_coverage  # noqa: E402
from reshard.progress import peak_rss_mb  # noqa: E402
from reshard.synthetic import fake_hf_index, load_preset  # noqa: E402


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
    ap.add_argument("--dry-run", action="store_true", help="also print the dry-run report of this plan")
    a = ap.parse_args()
    rss0 = peak_rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    spec = load_preset(a.preset)
    index = fake_hf_index(spec, a.files)
    layout = Layout(tp=a.tp, pp=a.pp, first_stage_layers=a.first, last_stage_layers=a.last)
    layout.check(spec)
    tgts = torch_dist.targets(spec, layout, table_for(spec), lambda n: index.dtypes[n])
    plan = build_plan(index, tgts, a.world, buffer_bytes=a.buffer_mb << 20)
    took = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t1 = time.perf_counter()
    problems = check_coverage(plan, index.shapes)
    coverage_s = time.perf_counter() - t1
    assert not problems, problems[:5]
    reads = [s["read"] for s in plan.rank_stats()]
    mean = sum(reads) / len(reads)
    print(f"{a.preset} ({index.total_bytes / 1e9:.1f} GB in {a.files} files) -> torch_dist tp={a.tp} pp={a.pp} "
          f"(first/last stage {a.first}/{a.last} layers) "
          f"on {a.world} simulated ranks")
    print(f"plan: {took:.2f} s, {len(plan.pieces)} pieces (max {plan.max_piece_bytes / 2**20:.0f} MiB), "
          f"{plan.num_rounds} exchange round(s)")
    print(f"memory: Python allocations peak {py_peak / 2**20:.1f} MiB; process RSS {peak_rss_mb():.0f} MB "
          f"({peak_rss_mb() - rss0:.0f} MB above the interpreter with torch)")
    print(f"read balance: max/mean {max(reads) / mean:.3f}, min/mean {min(reads) / mean:.3f}; "
          f"idle ranks {sum(r == 0 for r in reads)}")
    print(f"coverage check (every target element once, every source element used): {coverage_s:.2f} s")
    if a.dry_run:
        from reshard import dryrun

        print(dryrun.format_text(dryrun.report(plan, file_based=False)))


if __name__ == "__main__":
    main()
