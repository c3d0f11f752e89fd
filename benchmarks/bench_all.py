"""`make bench`: the four everyday conversions on 2 ranks, against `cp -r` + `sync` and against
the single-process pattern of the usual tools, all timed in one run on the same machine.

    python benchmarks/bench_all.py [--sizes 0.5 2.0] [--repeat 3] [--cases hf2td legacy td2hf hf2meta]
                                   [--workdir DIR]

Cases (synthetic bf16 Llama-3-style models; the Megatron sources are written once by reshard,
untimed):
  hf2td    HF safetensors -> torch_dist TP=2 PP=2      baseline: load all, fuse, stack, dcp.save
  legacy   Megatron legacy TP=4 PP=2 -> TP=2 PP=4      baseline: load every rank file, merge, split, save
  td2hf    torch_dist TP=2 PP=2 -> HF safetensors      baseline: DCP-load all, unstack, split, save_file
  hf2meta  HF safetensors -> Meta consolidated x2      baseline: load all, permute q/k, split, torch.save
  moe      (on request) HF Mixtral-style -> legacy TP=2 EP=2   baseline: load all, build every file, save

Every timed command is followed by `sync` inside its timing (reshard fsyncs its files itself, as
it does by default; the others leave write-back to `sync`), and `sync` runs before each, so no
run pays for another's dirty pages. Methods are interleaved, best of --repeat. reshard starts
its own ranks (`launch.nproc=2`, one import, forked ranks), with verification on (the default)
and, separately, `verify=false`. Printed per case: the marginal seconds per GB of each method
(the slope between the two sizes) and its ratio to cp -r + sync's, the fixed start-up (the
intercept), the speed-up over the single-process tool at the larger size, and peak RSS per rank
against size/N + 300 MB; then the wall time of a tiny 2-rank conversion (launch.nproc and
torchrun). The goals of issue 14 are printed beside each figure.
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

ENV = dict(os.environ, PYTHONPATH=REPO)
ENV.pop("OMP_NUM_THREADS", None)  # reshard sets its ranks' threads itself; baselines use the machine
NPROC = 2

CASES = {
    "hf2td": {"title": "HF -> torch_dist TP=2 PP=2", "make": None,
              "run": ["parallel.target_tp=2", "parallel.target_pp=2"]},
    "legacy": {"title": "Megatron legacy TP=4 PP=2 -> TP=2 PP=4",
               "make": ["target.format=megatron_legacy", "parallel.target_tp=4", "parallel.target_pp=2"],
               "run": ["target.format=megatron_legacy", "parallel.target_tp=2", "parallel.target_pp=4"]},
    "td2hf": {"title": "torch_dist TP=2 PP=2 -> HF safetensors",
              "make": ["parallel.target_tp=2", "parallel.target_pp=2"], "run": ["target.format=hf"]},
    "hf2meta": {"title": "HF -> Meta consolidated (2 shards)", "make": None,
                "run": ["target.format=meta", "target.meta_shards=2"]},
    # not in the default set: an HF Mixtral-style MoE (8 experts) imported to legacy TP=2 EP=2
    "moe": {"title": "HF Mixtral-style MoE -> Megatron legacy TP=2 EP=2", "make": None, "preset": "tiny_mixtral",
            "run": ["target.format=megatron_legacy", "parallel.target_tp=2", "parallel.target_ep=2"]},
}
DEFAULT_CASES = ("hf2td", "legacy", "td2hf", "hf2meta")


def timed(cmd, sync_after: bool = True) -> tuple:
    os.sync()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO)
    if sync_after:
        os.sync()
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return dt, p.stdout + p.stderr


def reshard_cmd(src, dst, work, *extra, launcher="launch"):
    args = ["-m", "reshard", f"source.path={src}", f"target.path={dst}", "io.progress=none",
            f"paths.root={work}", "hydra.run.dir=" + os.path.join(work, "hydra"), *extra]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}", *args]
    return [sys.executable, *args, f"launch.nproc={NPROC}"]


def single_cmd(case, src, dst, spec):
    b = lambda f: os.path.join(HERE, f)  # noqa: E731
    if case == "hf2td":
        return [sys.executable, b("single_process_baseline.py"), src, dst, "2"]
    if case == "legacy":
        return [sys.executable, b("single_process_legacy_baseline.py"), os.path.join(src, "release"), dst,
                "4", "2", "2", "4"]
    if case == "td2hf":
        return [sys.executable, b("single_process_td_to_hf.py"), os.path.join(src, "release"), dst,
                str(spec.num_attention_heads), str(spec.num_query_groups), str(spec.vocab_size)]
    if case == "moe":
        return [sys.executable, b("single_process_moe_baseline.py"), src, dst, "2", "2"]
    return [sys.executable, b("single_process_hf_to_meta.py"), src, dst, "2"]


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def source(work, case, gb):
    """The source of ``case`` at ``gb`` (the HF model of that size, or reshard's conversion of it)."""
    preset = CASES[case].get("preset", "tiny_llama3")
    spec = scaled(load_preset(preset), gb, torch.bfloat16)
    hf = os.path.join(work, f"{preset}_{gb}")
    if not os.path.isdir(hf):
        write_hf(hf, spec, torch.bfloat16, shards=max(2, round(gb / 0.5)))
    make = CASES[case]["make"]
    if make is None:
        return hf, spec
    src = os.path.join(work, f"{case}{gb}")
    if not os.path.isdir(src):
        timed(reshard_cmd(hf, src, work, "verify=false", *make))
    return src, spec


def bench(work, case, gb, repeat):
    src, spec = source(work, case, gb)
    out = {"bytes": dir_bytes(src)}
    methods = ("cp", "reshard", "noverify", "single")
    times = {m: [] for m in methods}
    for _ in range(repeat):
        for m in methods:
            dst = os.path.join(work, f"out_{m}")
            shutil.rmtree(dst, ignore_errors=True)
            if m == "cp":
                dt, _ = timed(["cp", "-r", src, dst])
            elif m in ("reshard", "noverify"):
                dt, _ = timed(reshard_cmd(src, dst, work, *CASES[case]["run"],
                                          *(["verify=false"] if m == "noverify" else [])))
                with open(os.path.join(dst, "reshard_report.json")) as f:
                    rep = json.load(f)
                if m == "reshard":
                    out["rss"] = [r["peak_rss_mb"] for r in rep["ranks"]]
                    out["verify_s"] = rep["verify"]["seconds"]
                    out["first_byte_s"] = rep["first_byte_s"]
                    out["kernel"] = rep["totals"]["bytes_kernel_copied"] / max(1, rep["totals"]["bytes_written"])
            else:
                dt, log = timed(single_cmd(case, src, dst, spec))
                out["single_rss"] = float(re.search(r"peak_rss_mb=(\d+)", log).group(1))
            times[m].append(dt)
            shutil.rmtree(dst, ignore_errors=True)
    for m, ts in times.items():
        out[m] = min(ts)
        out[m + "_all"] = [round(t, 2) for t in ts]
    return out


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report_case(case, small, big):
    dgb = (big["bytes"] - small["bytes"]) / 1e9
    marg = {m: (big[m] - small[m]) / dgb for m in ("cp", "reshard", "noverify", "single")}
    start = {m: small[m] - marg[m] * small["bytes"] / 1e9 for m in marg}
    r_v, r_nv = marg["reshard"] / marg["cp"], marg["noverify"] / marg["cp"]
    speed = big["single"] / big["reshard"]
    share = big["bytes"] / 2**20 / NPROC
    rss_ok = all(x <= share + 300 for x in big["rss"])
    print(f"\n== {CASES[case]['title']} on {NPROC} ranks (launch.nproc), bf16, best of {len(big['cp_all'])}")
    print(f"{'GB':>6} {'cp+sync':>8} {'reshard':>8} {'no-verify':>9} {'single':>8}  {'rank RSS MB':>14} "
          f"{'single RSS':>10} {'verify s':>8} {'1st byte s':>10}")
    for r in (small, big):
        print(f"{r['bytes'] / 1e9:6.3f} {r['cp']:8.2f} {r['reshard']:8.2f} {r['noverify']:9.2f} {r['single']:8.2f}  "
              f"{str([round(x) for x in r['rss']]):>14} {r['single_rss']:10.0f} {r['verify_s']:8.2f} "
              f"{r['first_byte_s']:10.2f}")
    print(f"marginal s/GB: cp+sync {marg['cp']:.3f}, reshard {marg['reshard']:.3f}, no-verify {marg['noverify']:.3f}, "
          f"single {marg['single']:.3f}")
    print(f"  reshard / cp+sync   {r_v:.2f}x (goal <= 1.3x: {verdict(r_v <= 1.3)}); "
          f"no-verify / cp+sync {r_nv:.2f}x (goal <= 1.1x: {verdict(r_nv <= 1.1)})")
    print(f"  fixed start-up: reshard {start['reshard']:.2f} s, no-verify {start['noverify']:.2f} s, "
          f"cp {start['cp']:.2f} s, single {start['single']:.2f} s")
    print(f"  speed-up over the single process at {big['bytes'] / 1e9:.2f} GB: {speed:.2f}x "
          f"(goal >= 3x: {verdict(speed >= 3)})")
    print(f"  peak RSS per rank {[round(x) for x in big['rss']]} MB vs size/N + 300 = {share + 300:.0f} MB "
          f"({verdict(rss_ok)}); single process {big['single_rss']:.0f} MB; "
          f"bytes copied by the kernel: {big['kernel']:.2f} of those written")
    for r in (small, big):
        print(f"  all runs at {r['bytes'] / 1e9:.2f} GB: cp {r['cp_all']}, reshard {r['reshard_all']}, "
              f"no-verify {r['noverify_all']}, single {r['single_all']}")
    return {"case": case, "ratio_verify": r_v, "ratio_noverify": r_nv, "speedup": speed, "rss_ok": rss_ok}


def tiny(work, repeat):
    hf = os.path.join(work, "tiny")
    if not os.path.isdir(hf):
        write_hf(hf, load_preset("tiny_llama3"), torch.bfloat16, shards=3)
    out = {}
    for launcher in ("launch", "torchrun"):
        ts = []
        for _ in range(repeat):
            dst = os.path.join(work, "tiny_out")
            shutil.rmtree(dst, ignore_errors=True)
            ts.append(timed(reshard_cmd(hf, dst, work, "parallel.target_tp=2", "parallel.target_pp=2",
                                        launcher=launcher), sync_after=False)[0])
        out[launcher] = ts
    best = min(out["launch"])
    print(f"\n== a tiny 2-rank conversion (tiny_llama3 HF -> torch_dist TP=2 PP=2, verified): "
          f"launch.nproc=2 {best:.2f} s (goal <= 2.5 s: {verdict(best <= 2.5)}), torchrun {min(out['torchrun']):.2f} s; "
          f"all runs {[round(t, 2) for t in out['launch']]} / {[round(t, 2) for t in out['torchrun']]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs=2, default=[0.5, 2.0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=list(CASES))
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="reshard-bench-")
    try:
        print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}; sizes {a.sizes} GB")
        rows = []
        for case in a.cases:
            small, big = (bench(work, case, gb, a.repeat) for gb in a.sizes)
            rows.append(report_case(case, small, big))
        tiny(work, a.repeat)
        print("\nsummary: " + "; ".join(f"{r['case']} {r['ratio_verify']:.2f}x/{r['ratio_noverify']:.2f}x cp, "
                                        f"{r['speedup']:.1f}x single" for r in rows))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
