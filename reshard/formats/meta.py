"""Meta consolidated checkpoints (FORMATS.md §2): ``params.json`` and ``consolidated.NN.pth``,
one model-parallel shard per file.

The split axis of every key is decided from the shapes (a shard that is 1/S of the full
tensor along one dimension), never from a name: ``tok_embeddings`` is split on dim 1 in
Llama-1/2 and on dim 0 in Llama-3. Meta rotates adjacent pairs where HF and Megatron rotate
halves, so ``wq``/``wk`` rows are permuted per head on the way in (a ``rope_meta_to_hf``
transform on the source slices) and back on the way out (``rope_hf_to_meta`` on the target
tensors). Files are read through :mod:`reshard.formats.torchzip` - no pickle is executed.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, List, Optional

import torch

from .. import dist as rdist
from ..errors import SourceError
from ..models import table_for
from ..types import Placement, TargetTensor
from ..spec import ModelSpec
from .base import RawReader, SourceIndex, SourceSlice, StoredTensor
from .target import TorchSaveTarget
from .torchzip import TensorRef, parse_file, stored_tensors

NAME = "meta"
ITERATIONS = False  # no iter_XXXXXXX directories
_FILE_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# canonical (HF) name -> Meta name; q/k carry the RoPE permutation
_LAYER = {
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}
_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
# Meta's split axis per key when writing (tok_embeddings: chosen per model, see _embedding_axis)
_AXIS = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0}
_DROPPED = ("rope.freqs",)


def names(spec: ModelSpec) -> Dict[str, str]:
    out = {}
    for i in range(spec.num_layers):
        for hf, meta in _LAYER.items():
            out[hf.format(i=i)] = meta.format(i=i)
    out.update(_TOP)
    return out


def _rope_heads(hf_name: str, spec: ModelSpec) -> Optional[int]:
    if hf_name.endswith("q_proj.weight"):
        return spec.num_attention_heads
    if hf_name.endswith("k_proj.weight"):
        return spec.num_query_groups
    return None


def detect(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "params.json")) and any(
        _FILE_RE.match(f) for f in os.listdir(path))


def ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's FeedForward hidden size."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, ffn: int) -> dict:
    """``multiple_of`` / ``ffn_dim_multiplier`` that reproduce ``ffn`` exactly."""
    base = int(2 * (4 * dim) / 3)
    for mo in (4096, 1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn % mo:
            continue
        if ffn_size(dim, mo, None) == ffn:
            return {"multiple_of": mo, "ffn_dim_multiplier": None}
        for mult in (ffn / base, round(ffn / base, 4), round(ffn / base, 2)):
            if ffn_size(dim, mo, mult) == ffn:
                return {"multiple_of": mo, "ffn_dim_multiplier": mult}
    raise SourceError(f"no multiple_of/ffn_dim_multiplier reproduces ffn_hidden_size={ffn} for dim={dim}")


def _spec_from_params(p: dict, where: str, shapes: Dict[str, tuple]) -> ModelSpec:
    try:
        dim, nh = int(p["dim"]), int(p["n_heads"])
        vocab = int(p.get("vocab_size", -1))
        if vocab <= 0:  # Llama-2's params.json says -1: the embedding knows
            emb = shapes["tok_embeddings.weight"]
            vocab = emb[0]
        ffn = shapes["layers.0.feed_forward.w1.weight"][0]
        want = ffn_size(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier"))
        if want != ffn:
            raise SourceError(f"{where}: params.json implies ffn size {want} but w1 has {ffn} rows")
        rope_scaling = None
        if p.get("use_scaled_rope"):
            rope_scaling = {"rope_type": "llama3", "factor": float(p.get("rope_scaling_factor", 8.0)),
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
        return ModelSpec.from_dict(dict(
            model_type="llama", num_layers=int(p["n_layers"]), hidden_size=dim, num_attention_heads=nh,
            num_query_groups=int(p.get("n_kv_heads") or nh), head_dim=dim // nh, ffn_hidden_size=ffn,
            vocab_size=vocab, norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=float(p.get("rope_theta", 10000)),
            rope_scaling=rope_scaling, max_position_embeddings=int(p.get("max_seq_len", 4096)),
            tie_word_embeddings=False, qkv_bias=False, dtype="bfloat16"))
    except KeyError as e:
        raise SourceError(f"{where}: params.json lacks {e.args[0]!r}") from None


def read_index(root: str, iteration=None, vocab_size=None) -> SourceIndex:
    """The shards' object trees, the split axis of every key, the spec, then the slices."""
    files = _shard_files(root)
    with open(os.path.join(root, "params.json")) as f:
        params = json.load(f)
    refs = _shard_refs(root, files)
    axis, full = _split_axes(refs, params)
    spec = _spec_from_params(params, root, full)
    if vocab_size is not None and vocab_size != spec.vocab_size:
        raise SourceError(f"{root}: model.vocab_size={vocab_size} but the checkpoint has {spec.vocab_size}")
    mapping = names(spec)
    _check_keys(root, set(refs[0]), mapping)
    slices, dtypes, shapes = {}, {}, {}
    for hf_name, meta_name in mapping.items():
        slices[hf_name] = _key_slices(root, files, refs, meta_name, axis[meta_name],
                                      ("rope_meta_to_hf", spec.head_dim) if _rope_heads(hf_name, spec) else None)
        dtypes[hf_name] = refs[0][meta_name].dtype
        shapes[hf_name] = full[meta_name]
    expected = {n: e.part_shape(spec, role) for n, (e, role, _) in table_for(spec).canonical_names(spec).items()}
    bad = [f"{mapping[n]}: {shapes[n]} vs {expected[n]}" for n in expected if tuple(shapes[n]) != expected[n]]
    if bad:
        raise SourceError(f"{root}: shapes disagree with params.json: {bad[:5]}")
    sizes = {f: os.path.getsize(os.path.join(root, f)) for f in files}
    return SourceIndex(NAME, root, spec, shapes, dtypes, slices, sizes, None)


def _shard_files(root: str) -> List[str]:
    """``consolidated.00.pth`` ... in order; a gap in the numbering is a missing shard."""
    files = sorted((int(m.group(1)), f) for f in os.listdir(root) if (m := _FILE_RE.match(f)))
    S = len(files)
    if [n for n, _ in files] != list(range(S)):
        raise SourceError(f"{root}: consolidated.*.pth files are not numbered 00..{S - 1:02d}: "
                          f"{[f for _, f in files]} (a shard is missing?)")
    return [f for _, f in files]


def _shard_refs(root: str, files: List[str]) -> List[Dict[str, TensorRef]]:
    """Each shard's tensors (parsed by the ranks in turn); every shard must hold the same keys and shapes."""
    parsed = rdist.map_shared(lambda f: parse_file(os.path.join(root, f)), files)
    refs: List[Dict[str, TensorRef]] = []
    for fname, obj in zip(files, parsed):
        if not isinstance(obj, dict):
            raise SourceError(f"{root}/{fname} is not a state dict")
        refs.append({k: v for k, v in obj.items() if isinstance(v, TensorRef)})
    keys = set(refs[0])
    for fname, r in zip(files, refs):
        if set(r) != keys:
            raise SourceError(f"{root}/{fname} holds other keys than {files[0]}: {sorted(set(r) ^ keys)[:5]}")
    for k in keys:
        shp = [tuple(r[k].shape) for r in refs]
        if any(s != shp[0] for s in shp):
            raise SourceError(f"{root}: {k} has different shapes across shards: {shp}")
    return refs


def _split_axes(refs: List[Dict[str, TensorRef]], params: dict):
    """``(axis, full shape)`` of every key, decided from the shapes against what params.json implies
    for the full tensors (``axis`` None: every shard holds a copy)."""
    S = len(refs)
    dim, nh = int(params["dim"]), int(params["n_heads"])
    nkv = int(params.get("n_kv_heads") or nh)
    hd = dim // nh
    expect_rows = {"wq": nh * hd, "wk": nkv * hd, "wv": nkv * hd}
    axis, full = {}, {}
    for k, ref in refs[0].items():
        s = full[k] = tuple(ref.shape)
        short, ax = k.split(".")[-2], None
        if len(s) > 1 and S > 1:
            if short in expect_rows:
                ax = 0 if s[0] * S == expect_rows[short] else None
            elif short in ("wo", "w2"):
                ax = 1 if s[0] == dim else None
            elif short in ("w1", "w3"):
                ax = 0 if s[1] == dim else None
            elif k == "tok_embeddings.weight":
                ax = 1 if s[1] * S == dim else 0
            elif k == "output.weight":
                ax = 0 if s[1] == dim else 1
        axis[k] = ax
        if ax is not None:
            full[k] = tuple(x * S if d == ax else x for d, x in enumerate(s))
    return axis, full


def _check_keys(root: str, keys, mapping: Dict[str, str]) -> None:
    problems = []
    unknown = sorted(k for k in keys if k not in set(mapping.values()) and k not in _DROPPED)
    if unknown:
        problems.append(f"unknown tensors (refusing to drop them silently): {unknown[:8]}")
    absent = sorted(m for m in mapping.values() if m not in keys)
    if absent:
        problems.append(f"absent tensors: {absent[:8]}")
    if problems:
        raise SourceError(f"{root} does not match params.json:\n  - " + "\n  - ".join(problems))


def _key_slices(root: str, files: List[str], refs, meta_name: str, ax: Optional[int], transform) -> List[SourceSlice]:
    """Where one key's canonical tensor lives: one slice per shard along ``ax``, or shard 0's copy."""
    out = []
    for s, (fname, r) in enumerate(zip(files, refs)):
        ref = r[meta_name]
        if not ref.contiguous:
            raise SourceError(f"{root}/{fname}: {meta_name} is stored non-contiguous")
        st = StoredTensor(fname, meta_name, tuple(ref.shape), ref.dtype, ref.offset)
        zero = (0,) * len(ref.shape)
        if ax is None:
            if s == 0:
                out.append(SourceSlice(st, zero, zero, tuple(ref.shape), transform))
            continue
        c_off = tuple(s * ref.shape[d] if d == ax else 0 for d in range(len(ref.shape)))
        out.append(SourceSlice(st, c_off, zero, tuple(ref.shape), transform))
    return out


class Reader(RawReader):
    """A .pth file is a torch.save archive: tensor bytes at known offsets."""


def stored(path: str) -> list:
    """Every tensor of every ``consolidated.NN.pth`` (``reshard inspect``)."""
    files = sorted(f for f in os.listdir(path) if _FILE_RE.match(f))
    return stored_tensors(path, files, lambda o: o)


# ------------------------------------------------------------------------- writing

def _embedding_axis(spec: ModelSpec) -> int:
    """Llama-3's VocabParallelEmbedding splits rows; Llama-1/2's ParallelEmbedding columns."""
    return 0 if spec.vocab_size >= 100_000 else 1


def check_shards(spec: ModelSpec, shards: int) -> List[str]:
    out = []
    for what, n in (("n_heads", spec.num_attention_heads), ("n_kv_heads", spec.num_query_groups),
                    ("ffn size", spec.ffn_hidden_size), ("dim", spec.hidden_size)):
        if n % shards:
            out.append(f"{what}={n} is not divisible by target.meta_shards={shards}")
    if _embedding_axis(spec) == 0 and spec.vocab_size % shards:
        out.append(f"vocab_size={spec.vocab_size} is not divisible by target.meta_shards={shards}")
    if spec.qkv_bias or spec.tie_word_embeddings or spec.model_type != "llama":
        out.append(f"the Meta format holds Llama models only (this is {spec.model_type}"
                   f"{', qkv bias' if spec.qkv_bias else ''}{', tied embeddings' if spec.tie_word_embeddings else ''})")
    return out


def targets(spec: ModelSpec, table, dtype_of: Callable[[str], torch.dtype], shards: int) -> List[TargetTensor]:
    out = []
    shapes = {n: e.part_shape(spec, role) for n, (e, role, _) in table.canonical_names(spec).items()}
    for hf_name, meta_name in names(spec).items():
        shape = shapes[hf_name]
        short = meta_name.split(".")[-2]
        ax = _embedding_axis(spec) if meta_name == "tok_embeddings.weight" else _AXIS.get(short)
        heads = _rope_heads(hf_name, spec)
        for s in range(shards):
            file = f"consolidated.{s:02d}.pth"
            if ax is None or len(shape) == 1:
                local, c_off = shape, (0,) * len(shape)
            else:
                n = shape[ax] // shards
                local = tuple(n if d == ax else x for d, x in enumerate(shape))
                c_off = tuple(s * n if d == ax else 0 for d in range(len(shape)))
            out.append(TargetTensor(f"{file}::{meta_name}", local, dtype_of(hf_name),
                                    [Placement(hf_name, c_off, local, (0,) * len(shape))], file=file,
                                    name=meta_name,
                                    transform=("rope_hf_to_meta", spec.head_dim) if heads else None))
    return out


def params_json(spec: ModelSpec) -> dict:
    p = {"dim": spec.hidden_size, "n_layers": spec.num_layers, "n_heads": spec.num_attention_heads,
         "n_kv_heads": spec.num_query_groups, "vocab_size": spec.vocab_size, "norm_eps": spec.norm_eps,
         "rope_theta": spec.rope_theta, "max_seq_len": spec.max_position_embeddings}
    p.update({k: v for k, v in ffn_params(spec.hidden_size, spec.ffn_hidden_size).items() if v is not None})
    rs = dict(spec.rope_scaling or {})
    if rs.get("rope_type") == "llama3":
        p["use_scaled_rope"] = True
        if rs.get("factor", 8.0) != 8.0:
            p["rope_scaling_factor"] = rs["factor"]
    elif rs:
        raise SourceError(f"rope scaling {rs} has no Meta params.json spelling")
    if spec.head_dim * spec.num_attention_heads != spec.hidden_size:
        raise SourceError("the Meta format needs head_dim * n_heads == dim")
    return p


class Target(TorchSaveTarget):
    """``consolidated.NN.pth`` (flat dicts of Meta names, wq/wk rows in Meta's RoPE order) and
    ``params.json``; ``tokenizer.model`` from the side-file folder or a Meta source."""

    name = NAME

    def check(self) -> None:
        from ..errors import LayoutError

        spec = self.ctx.spec
        if spec.is_encoder:
            raise LayoutError(f"target.format=meta: {spec.model_type} is an encoder; Meta's consolidated format holds "
                              "Llama models only. A Megatron BERT goes to megatron_legacy, torch_dist or fsdp_dtensor")
        if spec.is_moe:
            raise LayoutError("target.format=meta: Meta's consolidated format is written for dense Llama models "
                              "only; mixture-of-experts models go to hf, torch_dist or megatron_legacy")
        problems = check_shards(spec, self.ctx.cfg.target.meta_shards)
        if problems:
            raise LayoutError(f"cannot write {spec.name or spec.model_type} as Meta shards:\n  - "
                              + "\n  - ".join(problems))
        params_json(spec)  # fails early when the spec has no Meta spelling

    def tensors(self):
        c = self.ctx
        return targets(c.spec, c.table, c.dtype_of, c.cfg.target.meta_shards)

    def obj(self, job, file: str, tensors: dict) -> dict:
        return tensors

    def side_files(self, job, out_dir: str) -> None:
        import shutil

        with open(os.path.join(out_dir, "params.json"), "w") as f:
            json.dump(params_json(job.spec), f, indent=2)
        for d in (self.ctx.cfg.target.hf_side_files, job.source if job.index.format == NAME else None):
            if d and os.path.isfile(os.path.join(d, "tokenizer.model")):
                shutil.copy2(os.path.join(d, "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))
                break
