"""Megatron legacy -> legacy layout change (TP=4 PP=2 -> TP=2 PP=4) on 2 ranks, against `cp -r`
and the single-process pattern of the usual tools (load every rank file, merge, split, save).

    python benchmarks/bench_legacy_layout.py [--sizes 0.5 2.0] [--repeat 2] [--workdir DIR]

The legacy sources are written once by reshard from synthetic bf16 Llama-3-style models
(untimed); then every method is timed in the same run on the same page-cached files, best of
--repeat, interleaved. Printed: marginal cost per GB against cp -r, start-up, speed-up over the
single-process tool at the larger size, peak RSS per rank, bytes read / source bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_hf_to_torch_dist import ENV, baseline_rss_mb, timed  # noqa: E402

from reshard.synthetic import load_preset, scaled, write_hf  # noqa: E402

SRC_TP, SRC_PP, TP, PP = 4, 2, 2, 4


def reshard_cmd(nproc, src, dst, work, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "reshard", f"source.path={src}", f"target.path={dst}", "io.fsync=false", "io.progress=none",
            f"paths.root={work}", "hydra.run.dir=" + os.path.join(work, "hydra"), *extra]


def bench_size(work: str, gb: float, repeat: int, nproc: int) -> dict:
    base = os.path.join(work, f"m{gb}")
    src = os.path.join(base, "legacy")
    if not os.path.isdir(src):
        spec = scaled(load_preset("tiny_llama3"), gb, torch.bfloat16)
        write_hf(os.path.join(base, "hf"), spec, torch.bfloat16, shards=max(2, round(gb / 0.5)))
        timed(reshard_cmd(2, os.path.join(base, "hf"), src, work, "target.format=megatron_legacy",
                          f"parallel.target_tp={SRC_TP}", f"parallel.target_pp={SRC_PP}"))
        shutil.rmtree(os.path.join(base, "hf"))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(src) for f in fs)
    out = {"bytes": size}
    times = {name: [] for name in ("cp", "reshard", "single")}
    for _ in range(repeat):
        for name in times:
            dst = os.path.join(base, f"out_{name}")
            shutil.rmtree(dst, ignore_errors=True)
            if name == "cp":
                dt, _ = timed(["cp", "-r", src, dst])
            elif name == "reshard":
                dt, _ = timed(reshard_cmd(nproc, src, dst, work, "target.format=megatron_legacy",
                                          f"parallel.target_tp={TP}", f"parallel.target_pp={PP}"))
                with open(os.path.join(dst, "reshard_report.json")) as f:
                    rep = json.load(f)
                out["rss"] = [r["peak_rss_mb"] for r in rep["ranks"]]
                out["read"] = rep["totals"]["bytes_read"]
            else:
                dt, log = timed([sys.executable, os.path.join(HERE, "single_process_legacy_baseline.py"),
                                 os.path.join(src, "release"), dst, str(SRC_TP), str(SRC_PP), str(TP), str(PP)])
                out["single_rss"] = float(re.search(r"peak_rss_mb=(\d+)", log).group(1))
            times[name].append(dt)
            shutil.rmtree(dst, ignore_errors=True)
    for name, ts in times.items():
        out[name] = min(ts)
        out[name + "_all"] = [round(t, 2) for t in ts]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs=2, default=[0.5, 2.0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="reshard-bench-")
    try:
        small, big = (bench_size(work, gb, a.repeat, a.nproc) for gb in a.sizes)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    dgb = (big["bytes"] - small["bytes"]) / 1e9
    marg = {m: (big[m] - small[m]) / dgb for m in ("cp", "reshard", "single")}
    start = {m: small[m] - marg[m] * small["bytes"] / 1e9 for m in marg}
    base_rss = baseline_rss_mb()
    print(f"Megatron legacy TP={SRC_TP} PP={SRC_PP} -> TP={TP} PP={PP} on {a.nproc} ranks, synthetic bf16 Llama, "
          f"warm page cache, best of {a.repeat}")
    print(f"{'size GB':>8} {'cp -r s':>8} {'reshard s':>10} {'single s':>9} {'rank RSS MB':>16} {'single RSS MB':>14}")
    for r in (small, big):
        print(f"{r['bytes'] / 1e9:8.3f} {r['cp']:8.2f} {r['reshard']:10.2f} {r['single']:9.2f} "
              f"{str([round(x) for x in r['rss']]):>16} {r['single_rss']:14.0f}")
    print(f"marginal s/GB: cp {marg['cp']:.3f}, reshard {marg['reshard']:.3f}, single {marg['single']:.3f}; "
          f"ratio reshard/cp {marg['reshard'] / marg['cp']:.2f}x")
    print(f"fixed start-up: reshard {start['reshard']:.2f} s, cp {start['cp']:.2f} s, single {start['single']:.2f} s")
    print(f"speed-up over the single-process tool at {big['bytes'] / 1e9:.2f} GB: {big['single'] / big['reshard']:.2f}x")
    print(f"peak RSS per rank at {big['bytes'] / 1e9:.2f} GB: {[round(x) for x in big['rss']]} MB "
          f"(idle interpreter with torch {base_rss:.0f} MB; size/N {big['bytes'] / 2**20 / a.nproc:.0f} MB); "
          f"single process: {big['single_rss']:.0f} MB")
    print(f"bytes read / source bytes: {big['read'] / big['bytes']:.4f} (pickles, args and vocab padding are the rest)")
    for r in (small, big):
        print(f"all runs at {r['bytes'] / 1e9:.2f} GB: cp {r['cp_all']}, reshard {r['reshard_all']}, "
              f"single {r['single_all']}")


if __name__ == "__main__":
    main()
