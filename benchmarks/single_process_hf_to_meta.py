"""The pattern of the usual converters, as a baseline: one process loads every tensor of the
HF checkpoint, permutes q/k rows to Meta's RoPE order, splits every tensor into the model-parallel
shards and saves each ``consolidated.NN.pth`` with torch.save (what Meta's and most conversion
scripts do, in the other direction too).

    python benchmarks/single_process_hf_to_meta.py SRC_HF_DIR DST_DIR SHARDS

Prints ``peak_rss_mb=<n>`` at the end.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from single_process_baseline import load_hf_dir  # noqa: E402

from reshard.formats.meta import _AXIS, _embedding_axis, _rope_heads, names  # noqa: E402
from reshard.progress import peak_rss_mb  # noqa: E402
from reshard.spec import read_hf_config  # noqa: E402
from reshard.transforms import rope_hf_to_meta  # noqa: E402


def main():
    src, dst, shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = read_hf_config(src)
    _, hf = load_hf_dir(src)
    out = [{} for _ in range(shards)]
    for hf_name, meta_name in names(spec).items():
        t = hf.pop(hf_name)
        heads = _rope_heads(hf_name, spec)
        if heads:
            t = rope_hf_to_meta(t, heads)
        ax = _embedding_axis(spec) if meta_name == "tok_embeddings.weight" else _AXIS.get(meta_name.split(".")[-2])
        parts = [t] * shards if ax is None or t.dim() == 1 else t.chunk(shards, dim=ax)
        for s, part in enumerate(parts):
            out[s][meta_name] = part.clone()
    os.makedirs(dst, exist_ok=True)
    for s, sd in enumerate(out):
        torch.save(sd, os.path.join(dst, f"consolidated.{s:02d}.pth"))
    print(f"peak_rss_mb={peak_rss_mb():.0f}")


if __name__ == "__main__":
    main()
