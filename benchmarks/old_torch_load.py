"""Do reshard's CRC-less outputs load with the oldest torch the project supports (2.6)?

    # once: a venv with torch 2.6 (PyPI's build; ~3 GB with its CUDA libraries, runs on the CPU)
    python3 -m venv /tmp/v26 && /tmp/v26/bin/pip install torch==2.6.0
    # outputs written by this checkout's torch (io.crc32=false, the default)
    python -m reshard source.path=SRC target.path=OUT/legacy target.format=megatron_legacy parallel.target_tp=2
    python -m reshard source.path=SRC target.path=OUT/meta target.format=meta
    python -m reshard source.path=SRC target.path=OUT/td
    /tmp/v26/bin/python benchmarks/old_torch_load.py OUT     # and the same with .venv/bin/python

Prints, per file, its zip CRCs (0: not computed) and a checksum of its first tensor read with
``torch.load``, and loads the torch_dist checkpoint with plain ``dcp.load``; the figures must
agree between the two interpreters.
"""

import glob
import sys
import zipfile

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata


def main(root: str) -> None:
    for f in sorted(glob.glob(root + "/legacy/release/*/model_optim_rng.pt") + glob.glob(root + "/meta/*.pth")):
        crcs = {i.CRC for i in zipfile.ZipFile(f).infolist()}
        obj = torch.load(f, weights_only=False)
        ts = {k: v for k, v in obj.get("model", obj).items() if isinstance(v, torch.Tensor)}
        first = next(iter(ts.values()))
        print(f"{f[len(root):]}: CRCs {sorted(crcs)}, torch {torch.__version__}: torch.load ok, {len(ts)} tensors, "
              f"sum of the first {float(first.double().sum()):.6f}")
    reader = dcp.FileSystemReader(root + "/td/release")
    md = reader.read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata)}
    dcp.load(sd, storage_reader=reader)
    emb = sd["embedding.word_embeddings.weight"]
    print(f"torch_dist: dcp.load ok with torch {torch.__version__}: {len(sd)} tensors, "
          f"embedding sum {float(emb.double().sum()):.6f}")


if __name__ == "__main__":
    main(sys.argv[1].rstrip("/"))
