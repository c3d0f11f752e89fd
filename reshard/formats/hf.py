"""Hugging Face safetensors checkpoints (FORMATS.md §1).

``config.json`` plus ``model.safetensors`` or shards with ``model.safetensors.index.json``.
The index is built from the safetensors headers alone (8-byte length + JSON), so it is fast
on any size and finds truncated or missing shards before any data moves. Reads are
``preadv`` of row runs, or copies out of a memory map for column blocks
(:class:`~reshard.formats.base.RawReader`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, Optional

import torch

from .. import faults
from ..errors import SourceError
from ..spec import load_hf_config, spec_from_hf_config
from ..types import FP8_BLOCKS, BlockScales
from .base import RawReader, SourceIndex, SourceSlice, StoredTensor
from .target import FileTarget

NAME = "hf"
ITERATIONS = False  # no iter_XXXXXXX directories
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def detect(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isfile(os.path.join(path, INDEX_FILE)) or os.path.isfile(os.path.join(path, SINGLE_FILE)))


def _weight_files(path: str) -> Dict[str, Optional[list]]:
    """File -> names the index promises in it (None for a single unindexed file)."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise SourceError(f"{index_path} is not a valid safetensors index ({e})") from None
        files: Dict[str, list] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        return files
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return {SINGLE_FILE: None}
    bins = [f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin")]
    if bins:
        raise SourceError(f"{path} holds only {bins[0]}-style torch pickles; convert them to safetensors "
                          "first (transformers: save_pretrained(safe_serialization=True))")
    raise SourceError(f"{path} has config.json but no {SINGLE_FILE} or {INDEX_FILE}")


_REFETCH = "; fetch or re-save this shard"


def read_header(file_path: str) -> Dict[str, StoredTensor]:
    """Parse a safetensors header and check the file holds every byte it promises."""
    rel = os.path.basename(file_path)
    try:
        size = os.path.getsize(file_path)
        with open(file_path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError(f"{file_path} is truncated ({size} bytes): no safetensors header")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > size - 8:
                raise SourceError(f"{file_path} is truncated: header says {hlen} bytes, file has {size}")
            header = json.loads(f.read(hlen))
    except FileNotFoundError:
        raise SourceError(f"shard {file_path} is named by the index but does not exist; "
                          "copy the complete checkpoint (every shard) and retry") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{file_path} cannot be read as safetensors: {e}") from None
    if not isinstance(header, dict):
        raise SourceError(f"{file_path} cannot be read as safetensors: its header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + hlen
    out, spans = {}, []
    for key, info in header.items():
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
            dtname = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{file_path}: tensor {key} has a malformed header entry {info!r}") from None
        dtype = DTYPES.get(dtname)
        if dtype is None:
            raise SourceError(f"{file_path}: tensor {key} has unsupported dtype {dtname}")
        nbytes = dtype.itemsize * math.prod(shape) if all(d >= 0 for d in shape) else -1
        if start < 0 or stop - start != nbytes:
            raise SourceError(f"{file_path}: tensor {key} ({dtname} {list(shape)}) needs {nbytes} bytes but its "
                              f"data_offsets [{start}, {stop}] span {stop - start}: the header is corrupt (the "
                              "safetensors library refuses this file too)" + _REFETCH)
        out[key] = StoredTensor(rel, key, shape, dtype, base + start)
        spans.append((start, stop, key))
    pos, prev = 0, None
    for start, stop, key in sorted(spans):  # the rules of safetensors' own validation
        if start < pos:
            raise SourceError(f"{file_path}: tensor {key} (bytes {start}..{stop}) overlaps tensor {prev}: the header "
                              "is corrupt (the safetensors library refuses this file too)" + _REFETCH)
        if start > pos:
            raise SourceError(f"{file_path}: {start - pos} bytes before tensor {key} belong to no tensor: the header "
                              "is corrupt (the safetensors library refuses this file too)" + _REFETCH)
        pos, prev = stop, key
    end = base + pos
    if end > size:
        raise SourceError(f"{file_path} is truncated: its header needs {end} bytes but the file has {size}; "
                          "the copy or download was interrupted - fetch this shard again")
    if end < size:
        raise SourceError(f"{file_path} has {size - end} bytes after its last tensor that its header does not "
                          "describe: the file is corrupt or was overwritten (the safetensors library refuses it "
                          "too); fetch this shard again")
    return out


def read_index(path: str, iteration=None, vocab_size=None) -> SourceIndex:
    """``iteration`` and ``vocab_size`` are for Megatron sources; HF has neither."""
    cfg = load_hf_config(path)
    spec = spec_from_hf_config(cfg, os.path.join(path, "config.json"))
    files = _weight_files(path)
    slices, shapes, dtypes, sizes, unlisted = {}, {}, {}, {}, {}
    for fname, promised in sorted(files.items()):
        stored = read_header(os.path.join(path, fname))
        sizes[fname] = os.path.getsize(os.path.join(path, fname))
        if promised is not None:
            absent = sorted(set(promised) - set(stored))
            if absent:
                raise SourceError(f"{os.path.join(path, fname)} lacks {len(absent)} tensor(s) its index "
                                  f"names: {absent[:8]}{' ...' if len(absent) > 8 else ''}")
        for key, st in stored.items():
            if promised is not None and key not in promised:
                where_else = next((f for f, names in files.items() if names and key in names), None)
                if where_else:
                    raise SourceError(f"{os.path.join(path, fname)} holds tensor {key}, which the index places in "
                                      f"{where_else}: two copies, and reshard will not guess which is right; fix "
                                      f"{INDEX_FILE} or remove the stray copy")
                unlisted.setdefault(fname, []).append(key)  # reported by check_source with the rest
                continue
            if key in slices:
                raise SourceError(f"tensor {key} appears in two files of {path}")
            zero = (0,) * len(st.shape)
            slices[key] = [SourceSlice(st, zero, zero, st.shape)]
            shapes[key] = st.shape
            dtypes[key] = st.dtype
    _dequantize_fp8(path, spec, cfg.get("quantization_config") or {}, slices, shapes, dtypes)
    return SourceIndex(NAME, path, spec, shapes, dtypes, slices, sizes, unlisted=unlisted)


FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"


def _dequantize_fp8(path: str, spec, q: dict, slices: dict, shapes: dict, dtypes: dict) -> None:
    """Block-scaled FP8 weights (DeepSeek-V3, Kimi-K2, Qwen3-FP8: ``quantization_config`` with
    ``quant_method: fp8`` and ``weight_block_size``): each weight's slice dequantizes as it is read
    (``fp8.float() * <name>_scale_inv`` per block), into the checkpoint's own dtype (``torch_dtype``,
    bf16) unless ``target.dtype`` says otherwise; the scales are consumed, not converted."""
    fp8 = sorted(k for k, d in dtypes.items() if d in FP8)
    if not fp8:
        return
    block = q.get("weight_block_size")
    if q.get("quant_method") != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise SourceError(f"{path}: {len(fp8)} float8 tensor(s) ({fp8[0]}, ...) but config.json has no block-scaled "
                          f"fp8 quantization_config (quant_method 'fp8' with weight_block_size [rows, cols]); "
                          f"found {q or 'none'}")
    br, bc = int(block[0]), int(block[1])
    out_dtype = getattr(torch, spec.dtype, None)
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point or out_dtype in FP8:
        out_dtype = torch.bfloat16
    problems = []
    for key in fp8:
        sk = key + SCALE_SUFFIX
        st = slices[key][0].stored
        if sk not in slices:
            problems.append(f"{key} is float8 but its scale {sk} is absent (refusing to read raw FP8 values)")
            continue
        sc = slices[sk][0].stored
        want = (-(-st.shape[0] // br), -(-st.shape[1] // bc)) if len(st.shape) == 2 else None
        if want is None or tuple(sc.shape) != want or sc.dtype not in (torch.float32, torch.bfloat16):
            problems.append(f"{sk} has shape {tuple(sc.shape)} {str(sc.dtype)[6:]}; a {list(st.shape)} weight in "
                            f"{br}x{bc} blocks needs {want} float32")
            continue
        zero = (0, 0)
        slices[key] = [SourceSlice(st, zero, zero, st.shape, (FP8_BLOCKS, BlockScales(sc, (br, bc))))]
        dtypes[key] = out_dtype
        for d in (slices, shapes, dtypes):
            del d[sk]
    if problems:
        raise SourceError(f"{path}: FP8 weights without usable scales:\n  - " + "\n  - ".join(problems[:20]))


class Reader(RawReader):
    """Safetensors data is C-order bytes at the offsets the header gives: the raw reader."""


def stored(path: str) -> list:
    """Every tensor of every ``.safetensors`` file, from the headers (``reshard inspect``)."""
    out = []
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            for key, st in read_header(os.path.join(path, f)).items():
                out.append({"name": key, "file": f, "shape": list(st.shape), "dtype": str(st.dtype)[6:],
                            "bytes": st.nbytes})
    return out


# ------------------------------------------------------------------------- writing

SIDE_FILE_SKIP = (".safetensors", ".bin", ".pth", ".pt")
SIDE_FILE_NAMES_SKIP = {"config.json", INDEX_FILE, "params.json", "reshard_report.json",
                        "latest_checkpointed_iteration.txt", "metadata.json", ".metadata"}


def _parse_size(s) -> int:
    if isinstance(s, (int, float)):
        return int(s)
    m = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = str(s).strip().upper()
    for unit in sorted(m, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * m[unit])
    return int(t)


def file_layout(names: Dict[str, int], max_shard_size, reference: Optional[Dict[str, str]] = None,
                world: int = 1) -> Dict[str, str]:
    """Canonical name -> output file. ``reference`` (an original weight_map) is followed where it
    names the tensor; otherwise tensors fill ``model-0000k-of-0000n.safetensors`` files of at most
    ``max_shard_size`` bytes in canonical order (a tensor larger than that gets a file alone)."""
    if reference and all(n in reference for n in names):
        return {n: reference[n] for n in names}
    if str(max_shard_size) == "auto":  # 5 GB, smaller when that would leave ranks without a file
        limit = min(5 * 10**9, max(64 << 20, -(-sum(names.values()) // world)))
    else:
        limit = _parse_size(max_shard_size)
    groups: list = [[]]
    acc = 0
    for n, nbytes in names.items():
        if groups[-1] and acc + nbytes > limit:
            groups.append([])
            acc = 0
        groups[-1].append(n)
        acc += nbytes
    if len(groups) == 1:
        return {n: SINGLE_FILE for n in groups[0]}
    k = len(groups)
    return {n: f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i, g in enumerate(groups) for n in g}


def canonical_order(table, spec) -> list:
    """Names in the order transformers writes them: embedding, layers in order, norm, lm_head."""
    names = list(table.canonical_names(spec))
    def key(n):
        if n.startswith("model.embed_tokens"):
            return (0, 0, n)
        if n.startswith("model.layers."):
            return (1, int(n.split(".")[2]), n)
        return (2 if n.startswith("model.norm") else 3, 0, n)
    return sorted(names, key=key)


def targets(spec, table, dtype_of, max_shard_size="auto", reference: Optional[Dict[str, str]] = None,
            world: int = 1):
    """One target tensor per canonical tensor (vocab padding never appears: it is not canonical)."""
    from ..types import Placement, TargetTensor

    shapes = {n: e.part_shape(spec, role) for n, (e, role, _) in table.canonical_names(spec).items()}
    order = canonical_order(table, spec)
    nbytes = {}
    for n in order:
        b = dtype_of(n).itemsize
        for s in shapes[n]:
            b *= s
        nbytes[n] = b
    files = file_layout(nbytes, max_shard_size, reference, world)
    out = []
    for n in order:
        zero = (0,) * len(shapes[n])
        out.append(TargetTensor(f"{files[n]}::{n}", shapes[n], dtype_of(n), [Placement(n, zero, shapes[n], zero)],
                                file=files[n], name=n))
    return out


def reference_weight_map(path: Optional[str]) -> Optional[Dict[str, str]]:
    if not path:
        return None
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return {k: SINGLE_FILE for k in read_header(os.path.join(path, SINGLE_FILE))}
    return None


_ST_DTYPES = {v: k for k, v in DTYPES.items()}


def header_bytes(tensors) -> bytes:
    """The 8-byte length and JSON header of a safetensors file of ``tensors`` (in that order;
    every name, dtype, shape and offset is known from the plan before any data exists)."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        n = t.nbytes
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class Target(FileTarget):
    """Safetensors files streamed: the header, then each tensor's bytes in name order - copied
    file to file where they pass unchanged, one tensor in memory otherwise."""

    name = NAME

    def check(self) -> None:
        from ..errors import LayoutError
        from ..spec import hf_problems

        spec = self.ctx.spec
        lost = hf_problems(spec)
        if lost:
            raise LayoutError(f"cannot write {spec.name or spec.model_type} as Hugging Face {spec.architecture} "
                              "without losing weights or changing the model:\n  - " + "\n  - ".join(lost))

    def tensors(self):
        c = self.ctx
        ref = c.cfg.target.hf_reference or (c.source if c.index.format == NAME else None)
        return targets(c.spec, c.table, c.dtype_of, c.cfg.target.max_shard_size, reference_weight_map(ref), c.world)

    def write_file(self, job, sink, file, items, emitter) -> int:
        items = sorted(items, key=lambda it: it[0].name)
        sink.write(header_bytes([t for t, _ in items]))
        kernel = 0
        for t, ps in items:
            kernel += emitter.emit(sink, t, ps)
            faults.point("write")
        return kernel

    def side_files(self, job, out_dir: str) -> None:
        tgts = list(job.plan.targets.values())
        weight_map = {t.name: t.file for t in tgts}
        total = sum(t.nbytes for t in tgts)
        source_dir = job.source if job.index.format == NAME else None
        write_side_files(out_dir, job.spec, tgts[0].dtype, source_dir, self.ctx.cfg.target.hf_side_files,
                         weight_map, total)


def hf_config(spec, dtype: torch.dtype, source_cfg: Optional[dict] = None) -> dict:
    """``config.json``: the spec in the field names current transformers reads (``rope_parameters``,
    ``dtype``) and the ones older releases read (``rope_theta``, ``rope_scaling``, ``torch_dtype``);
    token ids and other non-structural fields carried over from an HF source."""
    from ..spec import to_hf_config

    cfg = dict(source_cfg or {})
    for k in ("rope_parameters", "rope_scaling", "torch_dtype", "dtype", "quantization_config"):
        cfg.pop(k, None)
    cfg.update(to_hf_config(spec))
    name = str(dtype).replace("torch.", "")
    cfg["torch_dtype"] = name
    cfg["dtype"] = name
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope.update(dict(spec.rope_scaling))
    cfg["rope_parameters"] = rope
    if cfg.get("rope_scaling") is None:
        cfg.pop("rope_scaling", None)
    return cfg


def write_side_files(out_dir: str, spec, dtype: torch.dtype, source_dir: Optional[str], side_dir: Optional[str],
                     weight_map: Dict[str, str], total_size: int) -> None:
    """Rank 0: config.json, generation_config.json, the index, tokenizer and other side files."""
    import shutil

    source_cfg = None
    if source_dir and os.path.isfile(os.path.join(source_dir, "config.json")):
        with open(os.path.join(source_dir, "config.json")) as f:
            source_cfg = json.load(f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(spec, dtype, source_cfg), f, indent=2, sort_keys=True)
    for d in (side_dir, source_dir):  # an explicit side-file folder wins over the source's own files
        if not d or not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            src = os.path.join(d, name)
            if (name in SIDE_FILE_NAMES_SKIP or name.endswith(SIDE_FILE_SKIP) or name.startswith(".")
                    or not os.path.isfile(src) or os.path.exists(os.path.join(out_dir, name))):
                continue
            shutil.copy2(src, os.path.join(out_dir, name))
    gen = os.path.join(out_dir, "generation_config.json")
    if not os.path.exists(gen):
        g = {"_from_model_config": True}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if source_cfg and source_cfg.get(k) is not None:
                g[k] = source_cfg[k]
        with open(gen, "w") as f:
            json.dump(g, f, indent=2)
    files = set(weight_map.values())
    if files != {SINGLE_FILE}:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
