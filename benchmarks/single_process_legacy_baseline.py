"""The pattern of the usual Megatron layout-change tools, as a baseline: one process loads every
rank file of a legacy checkpoint (``torch.load``), merges the TP shards into full tensors, splits
them for the new TP, regroups layers for the new PP, and ``torch.save``s every new rank file.

    python benchmarks/single_process_legacy_baseline.py SRC_ITER_DIR DST_ITER_DIR SRC_TP SRC_PP TP PP

(The source and target use Transformer-Engine names, no VPP, untied embeddings.)
Prints ``peak_rss_mb=<n>`` at the end.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from reshard.progress import peak_rss_mb  # noqa: E402
from reshard.transforms import gated_tp_merge, gated_tp_shard  # noqa: E402

DIM0 = ("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")
DIM1 = ("linear_proj.weight", "linear_fc2.weight")


def rank_dir(t, p, pp):
    return f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")


def main():
    src, dst = sys.argv[1], sys.argv[2]
    stp, spp, tp, pp = map(int, sys.argv[3:7])
    files = {(t, p): torch.load(os.path.join(src, rank_dir(t, p, spp), "model_optim_rng.pt"), weights_only=False)
             for t in range(stp) for p in range(spp)}
    args = files[(0, 0)]["args"]
    L = args.num_layers
    full = {}
    for p in range(spp):
        per = L // spp
        names = files[(0, p)]["model"].keys()
        for name in names:
            if files[(0, p)]["model"][name] is None:
                continue
            shards = [files[(t, p)]["model"][name] for t in range(stp)]
            gname = name
            if name.startswith("decoder.layers."):
                parts = name.split(".")
                parts[2] = str(int(parts[2]) + p * per)
                gname = ".".join(parts)
            if name.endswith(DIM0):
                full[gname] = torch.cat(shards, 0)
            elif name.endswith(DIM1):
                full[gname] = torch.cat(shards, 1)
            elif name.endswith("linear_fc1.weight"):
                full[gname] = gated_tp_merge(shards)
            else:
                full[gname] = shards[0]
    del files
    per = L // pp
    for p in range(pp):
        for t in range(tp):
            model = {}
            for gname, w in full.items():
                name = gname
                if gname.startswith("decoder.layers."):
                    parts = gname.split(".")
                    i = int(parts[2])
                    if not p * per <= i < (p + 1) * per:
                        continue
                    parts[2] = str(i - p * per)
                    name = ".".join(parts)
                elif gname.startswith("embedding.") and p != 0:
                    continue
                elif not gname.startswith("embedding.") and p != pp - 1:
                    continue
                if gname.endswith(DIM0):
                    model[name] = w.chunk(tp, 0)[t].clone()
                elif gname.endswith(DIM1):
                    model[name] = w.chunk(tp, 1)[t].clone()
                elif gname.endswith("linear_fc1.weight"):
                    model[name] = gated_tp_shard(w, tp, t)
                else:
                    model[name] = w
            out = os.path.join(dst, rank_dir(t, p, pp), "model_optim_rng.pt")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": model}, out)
    print(f"peak_rss_mb={peak_rss_mb():.0f}")


if __name__ == "__main__":
    main()
