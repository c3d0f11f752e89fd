"""Synthetic Hugging Face checkpoints (random weights, real format) for the demo, tests and
benchmarks. No transformers needed: ``config.json`` + safetensors shards + index.

    python -m reshard.synthetic tiny_llama3 out/hf [--shards 3] [--dtype bfloat16]
    python -m reshard.synthetic tiny_llama3 out/hf --scale-to-gb 2.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Dict, Optional

import torch
import yaml
from safetensors.torch import save_file

from .models import table_for
from .spec import ModelSpec, to_hf_config

CONF_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "conf", "model")


def load_preset(name: str) -> ModelSpec:
    with open(os.path.join(CONF_MODEL, f"{name}.yaml")) as f:
        d = yaml.safe_load(f)
    d.pop("defaults", None)
    return ModelSpec.from_dict(d)


def canonical_shapes(spec: ModelSpec) -> Dict[str, tuple]:
    table = table_for(spec)
    return {name: entry.part_shape(spec, role) for name, (entry, role, _) in table.canonical_names(spec).items()}


def fake_hf_index(spec: ModelSpec, files: int = 3, dtype: torch.dtype = torch.bfloat16):
    """Metadata of an HF checkpoint of ``spec`` over ``files`` shards, with no data behind it:
    for planning tests and planning benchmarks at any size."""
    from .formats.base import SourceIndex, SourceSlice, StoredTensor

    shapes = canonical_shapes(spec)
    total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    slices, offs, acc = {}, [0] * files, 0
    for name, shape in shapes.items():
        f = min(files - 1, acc * files // total)
        st = StoredTensor(f"model-{f + 1:05d}-of-{files:05d}.safetensors", name, shape, dtype, offs[f])
        offs[f] += st.nbytes
        acc += st.nbytes
        zero = (0,) * len(shape)
        slices[name] = [SourceSlice(st, zero, zero, shape)]
    return SourceIndex("hf", "<synthetic>", spec, shapes, {n: dtype for n in shapes}, slices,
                       {f"model-{f + 1:05d}-of-{files:05d}.safetensors": offs[f] for f in range(files)})


def scaled(spec: ModelSpec, gb: float, dtype: torch.dtype) -> ModelSpec:
    """Same family, hidden and layers grown until the weights are about ``gb`` GB."""
    h = 512
    while True:
        s = dataclasses.replace(spec, hidden_size=h, num_attention_heads=h // 64, num_query_groups=max(1, h // 256),
                                head_dim=64, ffn_hidden_size=int(h * 8 / 3) // 64 * 64, vocab_size=32000,
                                num_layers=8)
        if spec.is_moe:  # experts half the dense ffn size (the shared expert, if any, the full size)
            shared = s.ffn_hidden_size if spec.shared_expert_ffn_hidden_size else 0
            s = dataclasses.replace(s, moe_ffn_hidden_size=s.ffn_hidden_size // 128 * 64,
                                    shared_expert_ffn_hidden_size=shared)
        per_layer = sum(math.prod(v) for k, v in canonical_shapes(s).items() if ".layers.0." in k)
        top = sum(math.prod(v) for k, v in canonical_shapes(s).items() if ".layers." not in k)
        layers = max(4, 4 * round((gb * 1e9 / dtype.itemsize - top) / per_layer / 4))  # splits for pp 1/2/4
        if layers <= 32 or h >= 8192:
            return dataclasses.replace(s, num_layers=int(layers), name=f"synthetic_{gb}gb")
        h *= 2


def write_hf(path: str, spec: ModelSpec, dtype: torch.dtype = torch.float32, shards: int = 2,
             seed: int = 0, std: float = 0.02) -> Dict[str, int]:
    """Write a random checkpoint of ``spec`` shard by shard; returns its bytes and file count."""
    os.makedirs(path, exist_ok=True)
    shapes = canonical_shapes(spec)
    names = list(shapes)
    total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    per_shard = total / max(1, shards)
    gen = torch.Generator().manual_seed(seed)
    weight_map, current, acc, k = {}, {}, 0, 0
    n_files = 0

    def flush(final=False):
        nonlocal current, n_files
        if not current:
            return
        n_files += 1
        fname = f"model-{n_files:05d}-of-XXXXX.safetensors"
        save_file(current, os.path.join(path, fname), metadata={"format": "pt"})
        for n in current:
            weight_map[n] = fname
        current = {}

    for name in names:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * std
        current[name] = t.to(dtype)
        acc += t.numel() * dtype.itemsize
        if acc >= per_shard * (k + 1) and k < shards - 1:
            k += 1
            flush()
    flush(final=True)
    # fix the "-of-N" names now that N is known
    renamed = {}
    for i in range(1, n_files + 1):
        old = f"model-{i:05d}-of-XXXXX.safetensors"
        new = f"model-{i:05d}-of-{n_files:05d}.safetensors"
        os.replace(os.path.join(path, old), os.path.join(path, new))
        renamed[old] = new
    weight_map = {n: renamed[f] for n, f in weight_map.items()}
    if n_files == 1:
        only = next(iter(renamed.values()))
        os.replace(os.path.join(path, only), os.path.join(path, "model.safetensors"))
    else:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = to_hf_config(dataclasses.replace(spec, dtype=str(dtype).replace("torch.", "")))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return {"bytes": total, "files": n_files}


def write_hf_sparse(path: str, spec: ModelSpec, dtype: torch.dtype = torch.bfloat16, files: int = 8) -> Dict[str, int]:
    """An HF checkpoint with real headers, index and config but no data: the files are sparse
    (their data is a hole the file system does not store). For dry runs and planning at scale -
    ``reshard ... dry_run=true`` on a 405B layout without 800 GB of disk."""
    os.makedirs(path, exist_ok=True)
    index = fake_hf_index(spec, files, dtype)
    names = {}
    for name, sl in index.slices.items():
        names.setdefault(sl[0].stored.file, []).append((name, sl[0].stored))
    weight_map, total = {}, 0
    for fname, items in sorted(names.items()):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, st in sorted(items, key=lambda x: x[1].offset):
            header[name] = {"dtype": {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype],
                            "shape": list(st.shape), "data_offsets": [off, off + st.nbytes]}
            off += st.nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + off)
        total += off
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_config(dataclasses.replace(spec, dtype=str(dtype).replace("torch.", ""))), f, indent=2)
    return {"bytes": total, "files": len(names)}


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="a conf/model preset name, e.g. tiny_llama3")
    ap.add_argument("out")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scale-to-gb", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparse", action="store_true",
                    help="headers only, data left as holes (for dry runs of big models; never convert it)")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    spec = load_preset(a.preset)
    if a.scale_to_gb:
        spec = scaled(spec, a.scale_to_gb, dtype)
    if a.sparse:
        info = write_hf_sparse(a.out, spec, dtype, a.shards)
    else:
        info = write_hf(a.out, spec, dtype, a.shards, a.seed)
    print(f"wrote {a.out}: {spec.model_type} {spec.num_layers} layers, hidden {spec.hidden_size}, "
          f"{info['bytes'] / 1e9:.3f} GB in {info['files']} file(s)")


if __name__ == "__main__":
    main()
