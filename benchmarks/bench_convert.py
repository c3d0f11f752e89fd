"""Conversions other than HF -> torch_dist on 2 ranks, against `cp -r` and the single-process
pattern of the usual tools:

    python benchmarks/bench_convert.py --case legacy   # Megatron legacy TP=4 PP=2 -> TP=2 PP=4
                                                       # (baseline: load every rank file, merge, split, save)
    python benchmarks/bench_convert.py --case td2hf    # torch_dist TP=2 PP=2 -> HF safetensors
                                                       # (baseline: DCP-load everything, split, save)
    python benchmarks/bench_convert.py --case moe      # HF Mixtral-style (8 experts) -> legacy TP=2 EP=2
                                                       # (baseline: load the whole HF model, build every
                                                       # mp_rank_TT_EEE file, save)
    [--sizes 0.5 2.0] [--repeat 2] [--workdir DIR]

The sources are written once by reshard from synthetic bf16 Llama-3-style models (untimed; the
MoE case converts a synthetic HF Mixtral-style model directly);
then every method is timed in the same run on the same page-cached files, best of --repeat,
interleaved. reshard runs with its default verification (checksums re-read from the output)
unless --no-verify. Printed: marginal cost per GB against cp -r, start-up, speed-up over the
single-process tool at the larger size, peak RSS per rank, bytes read / source bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_hf_to_torch_dist import baseline_rss_mb, timed  # noqa: E402

from reshard.synthetic import load_preset, scaled, write_hf  # noqa: E402

SRC_TP, SRC_PP, TP, PP = 4, 2, 2, 4
CASES = {
    "legacy": {"title": f"Megatron legacy TP={SRC_TP} PP={SRC_PP} -> TP={TP} PP={PP}",
               "make": ["target.format=megatron_legacy", f"parallel.target_tp={SRC_TP}",
                        f"parallel.target_pp={SRC_PP}"],
               "run": ["target.format=megatron_legacy", f"parallel.target_tp={TP}", f"parallel.target_pp={PP}"]},
    "td2hf": {"title": "torch_dist TP=2 PP=2 -> HF safetensors",
              "make": ["parallel.target_tp=2", "parallel.target_pp=2"],
              "run": ["target.format=hf"]},
    "moe": {"title": "HF Mixtral-style MoE (8 experts) -> Megatron legacy TP=2 EP=2", "make": None,
            "preset": "tiny_mixtral",
            "run": ["target.format=megatron_legacy", "parallel.target_tp=2", "parallel.target_ep=2"]},
}


def reshard_cmd(nproc, src, dst, work, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "reshard", f"source.path={src}", f"target.path={dst}", "io.fsync=false", "io.progress=none",
            f"paths.root={work}", "hydra.run.dir=" + os.path.join(work, "hydra"), *extra]


def bench_size(work: str, gb: float, repeat: int, nproc: int, case: str, verify: bool) -> dict:
    base = os.path.join(work, f"{case}{gb}")
    src = os.path.join(base, "src")
    spec = scaled(load_preset(CASES[case].get("preset", "tiny_llama3")), gb, torch.bfloat16)
    if not os.path.isdir(src):
        if CASES[case]["make"] is None:  # the HF checkpoint is the source
            write_hf(src, spec, torch.bfloat16, shards=max(2, round(gb / 0.5)))
        else:
            write_hf(os.path.join(base, "hf"), spec, torch.bfloat16, shards=max(2, round(gb / 0.5)))
            timed(reshard_cmd(2, os.path.join(base, "hf"), src, work, "verify=false", *CASES[case]["make"]))
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
                dt, _ = timed(reshard_cmd(nproc, src, dst, work, f"verify={str(verify).lower()}",
                                          *CASES[case]["run"]))
                with open(os.path.join(dst, "reshard_report.json")) as f:
                    rep = json.load(f)
                out["rss"] = [r["peak_rss_mb"] for r in rep["ranks"]]
                out["read"] = rep["totals"]["bytes_read"]
                out["verify_s"] = rep.get("verify", {}).get("seconds", 0.0)
            elif case == "moe":
                dt, log = timed([sys.executable, os.path.join(HERE, "single_process_moe_baseline.py"),
                                 src, dst, "2", "2"])
            elif case == "legacy":
                dt, log = timed([sys.executable, os.path.join(HERE, "single_process_legacy_baseline.py"),
                                 os.path.join(src, "release"), dst, str(SRC_TP), str(SRC_PP), str(TP), str(PP)])
            else:
                dt, log = timed([sys.executable, os.path.join(HERE, "single_process_td_to_hf.py"),
                                 os.path.join(src, "release"), dst, str(spec.num_attention_heads),
                                 str(spec.num_query_groups), str(spec.vocab_size)])
            if name == "single":
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
    ap.add_argument("--case", choices=sorted(CASES), default="legacy")
    ap.add_argument("--no-verify", action="store_true")
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="reshard-bench-")
    try:
        small, big = (bench_size(work, gb, a.repeat, a.nproc, a.case, not a.no_verify) for gb in a.sizes)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    dgb = (big["bytes"] - small["bytes"]) / 1e9
    marg = {m: (big[m] - small[m]) / dgb for m in ("cp", "reshard", "single")}
    start = {m: small[m] - marg[m] * small["bytes"] / 1e9 for m in marg}
    base_rss = baseline_rss_mb()
    model = "Mixtral-style MoE" if a.case == "moe" else "Llama"
    print(f"{CASES[a.case]['title']} on {a.nproc} ranks, synthetic bf16 {model}, warm page cache, best of {a.repeat}, "
          f"verify={'off' if a.no_verify else 'on'} (at {big['bytes'] / 1e9:.2f} GB it took {big['verify_s']:.2f} s)")
    print(f"{'size GB':>8} {'cp -r s':>8} {'reshard s':>10} {'single s':>9} {'rank RSS MB':>16} {'single RSS MB':>14}")
    for r in (small, big):
        print(f"{r['bytes'] / 1e9:8.3f} {r['cp']:8.2f} {r['reshard']:10.2f} {r['single']:9.2f} "
              f"{str([round(x) for x in r['rss']]):>16} {r['single_rss']:14.0f}")
    print(f"marginal s/GB: cp {marg['cp']:.3f}, reshard {marg['reshard']:.3f}, single {marg['single']:.3f}; "
          f"ratio reshard/cp {marg['reshard'] / marg['cp']:.2f}x")
    print(f"fixed start-up: reshard {start['reshard']:.2f} s, cp {start['cp']:.2f} s, single {start['single']:.2f} s")
    print(f"speed-up over the single-process tool at {big['bytes'] / 1e9:.2f} GB: "
          f"{big['single'] / big['reshard']:.2f}x")
    print(f"peak RSS per rank at {big['bytes'] / 1e9:.2f} GB: {[round(x) for x in big['rss']]} MB "
          f"(idle interpreter with torch {base_rss:.0f} MB; size/N {big['bytes'] / 2**20 / a.nproc:.0f} MB); "
          f"single process: {big['single_rss']:.0f} MB")
    print(f"bytes read / source bytes: {big['read'] / big['bytes']:.4f} (pickles, args and vocab padding are the rest)")
    for r in (small, big):
        print(f"all runs at {r['bytes'] / 1e9:.2f} GB: cp {r['cp_all']}, reshard {r['reshard_all']}, "
              f"single {r['single_all']}")


if __name__ == "__main__":
    main()
