"""A training checkpoint with its optimizer state, resharded on 2 ranks, against `cp -r` + `sync` of the
same checkpoint, in one run on the same machine (issue 12).

    python benchmarks/bench_optimizer.py [--hidden 1024] [--layers 6] [--repeat 2] [--workdir DIR]

The source is made once, untimed, by Megatron-core itself (tests/referees/mcore_train.py make, on 2 CPU
ranks at TP=2 DP=1: 2 Adam steps of its DistributedOptimizer, then saved as torch_dist fully_reshardable,
torch_dist dp_reshardable and legacy model_optim_rng.pt + distrib_optim.pt): fp32 weights, fp32 master
weights and Adam moments - about 4x the weights' bytes. Needs megatron-core (`make setup` installs it).

Timed, best of --repeat, `sync` before each and inside each timing (reshard fsyncs its files itself):

  cp        cp -r of the torch_dist (fully_reshardable) checkpoint, then sync
  full      torch_dist fully_reshardable TP=2 -> torch_dist TP=1 PP=2, optimizer carried
  full-nv   the same with verify=false (the re-read checksums of source and output left out)
  dp        torch_dist dp_reshardable    TP=2 -> torch_dist TP=1 PP=2 (bucket space decoded)
  legacy    legacy distrib_optim.pt      TP=2 -> legacy TP=1 PP=2 (distrib_optim.pt re-flattened)

Printed: seconds, GB/s of checkpoint bytes, the ratio to cp's time, peak RSS per rank above the
size of a rank's share (from reshard_report.json), and the bytes read against the source's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def run(cmd, env=None) -> float:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="bench_opt_")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    spec = {"model_type": "llama", "num_layers": a.layers, "hidden_size": a.hidden, "ffn_hidden_size": a.hidden * 11 // 4,
            "num_attention_heads": a.hidden // 64, "num_query_groups": a.hidden // 128, "head_dim": 64,
            "vocab_size": a.vocab, "norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
            "qkv_bias": False, "max_position_embeddings": 4096}
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "src")
    if not os.path.isdir(os.path.join(src, "legacy")):
        with open(os.path.join(work, "spec.json"), "w") as f:
            json.dump(spec, f)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        os.path.join(REPO, "tests", "referees", "mcore_train.py"), "make",
                        os.path.join(work, "spec.json"), src, "2"], check=True, env=env, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"source made by Megatron-core in {time.perf_counter() - t:.0f} s (untimed)")
    gb = du(os.path.join(src, "torch_dist")) / 1e9
    print(f"source: {gb:.2f} GB torch_dist fully_reshardable, {du(os.path.join(src, 'torch_dist_dp')) / 1e9:.2f} GB "
          f"dp_reshardable, {du(os.path.join(src, 'legacy')) / 1e9:.2f} GB legacy (weights + master weights + 2 "
          f"moments, fp32; {a.layers} layers, hidden {a.hidden}, vocab {a.vocab})")
    base = [sys.executable, "-m", "reshard", "launch.nproc=2", f"model.vocab_size={a.vocab}", "parallel.target_tp=1",
            "parallel.target_pp=2", "target.transformer_impl=local", "overwrite=true"]
    cases = {"full": ("torch_dist", "torch_dist"), "full-nv": ("torch_dist", "torch_dist"),
             "dp": ("torch_dist_dp", "torch_dist"), "legacy": ("legacy", "megatron_legacy")}
    best = {k: float("inf") for k in ["cp", *cases]}
    reports = {}
    for _ in range(a.repeat):
        dst = os.path.join(work, "cp")
        shutil.rmtree(dst, ignore_errors=True)
        best["cp"] = min(best["cp"], run(["cp", "-r", os.path.join(src, "torch_dist"), dst]))
        shutil.rmtree(dst, ignore_errors=True)
        for name, (form, fmt) in cases.items():
            out = os.path.join(work, f"out_{name}")
            best[name] = min(best[name], run(base + [f"source.path={os.path.join(src, form)}", f"target.path={out}",
                                                     f"target.format={fmt}"]
                                         + (["verify=false"] if name.endswith("-nv") else []), env))
            with open(os.path.join(out, "reshard_report.json")) as f:
                reports[name] = json.load(f)
            shutil.rmtree(out)
    print(f"cp -r + sync: {best['cp']:.2f} s ({gb / best['cp']:.2f} GB/s)")
    for name in cases:
        r = reports[name]
        size = du(os.path.join(src, cases[name][0])) / 1e9
        rss = [x["peak_rss_mb"] for x in r["ranks"]]
        t = r["totals"]
        print(f"{name:<7} {cases[name][0]:>13} -> {cases[name][1]:<15} {best[name]:6.2f} s ({size / best[name]:.2f} GB/s, "
              f"{best[name] / best['cp']:.2f}x cp's time); read {t['bytes_read'] / 1e9:.2f} GB of {size:.2f}, "
              f"exchanged {t['bytes_sent'] / 1e9:.2f} GB; peak RSS per rank {rss} MB "
              f"(a rank's share {size / 2 * 1e3:.0f} MB); "
              + (f"tensors verified: {r['verify']['tensors']}" if r.get("verify") else "verify=false"))
    if not a.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
