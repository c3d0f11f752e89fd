"""HF -> torch_dist (TP=2 PP=2) on 2 ranks against `cp -r` and a single-process converter.

    python benchmarks/bench_hf_to_torch_dist.py [--sizes 0.5 2.5] [--repeat 2] [--workdir DIR]

Synthetic Llama-3-style bf16 checkpoints of two sizes are written once; every method is
timed in the same run on the same (page-cached) files, best of --repeat. Printed:
  * marginal cost per extra GB, as a ratio to cp -r's  (goal <= 1.25x)
  * fixed start-up cost (intercept of the two sizes)  (goal <= 5 s)
  * speed-up over the single-process converter at the larger size  (goal >= 3x)
  * peak RSS per rank against size/N + exchange buffer, bytes read against source size
reshard runs with io.fsync=false here, since cp -r does not fsync either; `sync` runs before every
timed command so that write-back of one run does not land on the next.
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import torch  # noqa: E402

from reshard.synthetic import load_preset, scaled, write_hf  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")


def timed(cmd) -> tuple:
    os.sync()  # start each run with no dirty pages left over from the previous one
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return dt, p.stdout + p.stderr


def bench_size(work: str, gb: float, repeat: int, nproc: int, buffer_mb: int) -> dict:
    src = os.path.join(work, f"m{gb}", "hf")
    if not os.path.isdir(src):
        spec = scaled(load_preset("tiny_llama3"), gb, torch.bfloat16)
        write_hf(src, spec, torch.bfloat16, shards=max(2, round(gb / 0.5)))
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    out = {"gb": gb, "bytes": size}
    best = lambda xs: min(xs)  # noqa: E731
    times = {name: [] for name in ("cp", "reshard", "single")}
    for _ in range(repeat):  # interleaved, so that drift of the machine hits every method alike
        for name in times:
            dst = os.path.join(work, f"m{gb}", f"out_{name}")
            shutil.rmtree(dst, ignore_errors=True)
            if name == "cp":
                dt, _ = timed(["cp", "-r", src, dst])
            elif name == "reshard":
                dt, _ = timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={nproc}", "-m", "reshard", f"source.path={src}",
                               f"target.path={dst}", "parallel.target_tp=2", "parallel.target_pp=2",
                               "io.fsync=false", "io.progress=none", f"io.buffer_mb={buffer_mb}",
                               f"paths.root={work}", "hydra.run.dir=" + os.path.join(work, "hydra")])
                with open(os.path.join(dst, "reshard_report.json")) as f:
                    rep = json.load(f)
                out["rss"] = [r["peak_rss_mb"] for r in rep["ranks"]]
                out["read"] = rep["totals"]["bytes_read"]
                out["sent"] = rep["totals"]["bytes_sent"]
                out["kernel"] = rep["totals"]["bytes_kernel_copied"]
            else:
                dt, log = timed([sys.executable, os.path.join(HERE, "single_process_baseline.py"), src, dst, "2"])
                out["single_rss"] = float(re.search(r"peak_rss_mb=(\d+)", log).group(1))
            times[name].append(dt)
            shutil.rmtree(dst, ignore_errors=True)
    for name, ts in times.items():
        out[name] = best(ts)
        out[name + "_all"] = [round(t, 2) for t in ts]
    return out


def baseline_rss_mb() -> float:
    """RSS of an idle interpreter that imported what a rank imports (the fixed part)."""
    code = ("import torch, torch.distributed.checkpoint, hydra, safetensors; from reshard.progress import peak_rss_mb;"
            "print(peak_rss_mb())")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs=2, default=[0.5, 2.5])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--buffer-mb", type=int, default=512)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="reshard-bench-")
    try:
        small, big = (bench_size(work, gb, a.repeat, a.nproc, a.buffer_mb) for gb in a.sizes)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    dgb = (big["bytes"] - small["bytes"]) / 1e9
    marg = {m: (big[m] - small[m]) / dgb for m in ("cp", "reshard", "single")}
    start = {m: small[m] - marg[m] * small["bytes"] / 1e9 for m in marg}
    base_rss = baseline_rss_mb()
    floor = min(timed([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
                       os.path.join(HERE, "empty_job.py")])[0] for _ in range(a.repeat))
    print(f"HF -> torch_dist TP=2 PP=2 on {a.nproc} ranks, synthetic bf16 Llama, warm page cache, best of {a.repeat}")
    print(f"{'size GB':>8} {'cp -r s':>8} {'reshard s':>10} {'single s':>9} {'rank RSS MB':>16} {'single RSS MB':>14}")
    for r in (small, big):
        print(f"{r['bytes'] / 1e9:8.3f} {r['cp']:8.2f} {r['reshard']:10.2f} {r['single']:9.2f} "
              f"{str([round(x) for x in r['rss']]):>16} {r['single_rss']:14.0f}")
    print(f"marginal s/GB: cp {marg['cp']:.3f}, reshard {marg['reshard']:.3f}, single {marg['single']:.3f}")
    print(f"marginal cost ratio reshard/cp: {marg['reshard'] / marg['cp']:.2f}x (goal <= 1.25x)")
    print(f"fixed start-up: reshard {start['reshard']:.2f} s (goal <= 5 s), cp {start['cp']:.2f} s, "
          f"single {start['single']:.2f} s")
    print(f"  of which an empty torchrun job (python imports torch + DCP + hydra, joins gloo): {floor:.2f} s; "
          f"reshard's own start-up above it: {start['reshard'] - floor:.2f} s")
    print(f"speed-up over the single-process converter at {big['bytes'] / 1e9:.2f} GB: "
          f"{big['single'] / big['reshard']:.2f}x (goal >= 3x)")
    share = big["bytes"] / 2**20 / a.nproc
    print(f"peak RSS per rank at {big['bytes'] / 1e9:.2f} GB: {[round(x) for x in big['rss']]} MB; "
          f"size/N = {share:.0f} MB, exchange buffer = {a.buffer_mb} MB, bytes exchanged = {big['sent']}, "
          f"idle interpreter with torch = {base_rss:.0f} MB; above idle: "
          f"{[round(x - base_rss) for x in big['rss']]} MB")
    print(f"bytes read / source bytes: {big['read'] / big['bytes']:.4f} (safetensors headers are the rest); "
          f"copied file to file by the kernel: {big['kernel'] / big['read']:.3f} of it")
    for r in (small, big):
        print(f"all runs at {r['bytes'] / 1e9:.2f} GB: cp {r['cp_all']}, reshard {r['reshard_all']}, "
              f"single {r['single_all']}")


if __name__ == "__main__":
    main()
