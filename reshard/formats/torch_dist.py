"""Megatron-core ``torch_dist`` checkpoints, written with torch.distributed.checkpoint
(FORMATS.md §5).

Keys are global and TP/PP-independent: decoder tensors are stacked on a leading layer axis
under Transformer-Engine names; fc1 is the logical ``[W; V]``; embedding/output are padded
for the target TP. Each piece of the plan becomes one DCP chunk (a rectangle of the global
tensor) written by the rank that holds it - no DTensor, no full tensor anywhere. Also
written: ``_extra_state`` objects (``[None]``), the common state as the DCP byte entry
``common_state/shard_0_1``, ``metadata.json``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .. import dist as rdist
from .. import faults
from ..errors import ReshardError, SourceError, WriteError, is_lost_peer, is_no_space, lost_peer, space_error
from ..layout import Layout
from ..mapping import MappingTable
from ..models import table_for
from ..plan import Piece, Placement, TargetTensor
from ..spec import ModelSpec
from . import megatron as mg
from .base import RawReader, SourceIndex, SourceSlice, StoredTensor
from .files import sync, torch_save
from .torchzip import TensorRef, parse_file, parse_record, restricted_loads

NAME = "torch_dist"
STACK_PREFIX = "decoder.layers."
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
COMMON_KEY = "common_state/shard_0_1"


def _is_dcp_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def detect(path: str) -> bool:
    """A DCP directory, or a checkpoint root whose tracker names one."""
    if _is_dcp_dir(path):
        return True
    if not os.path.isfile(os.path.join(path, mg.TRACKER)):
        return False
    return any((d == "release" or d.startswith("iter_")) and _is_dcp_dir(os.path.join(path, d))
               for d in os.listdir(path))


# ------------------------------------------------------------------------- reading

OPTIONAL_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state")


def _record_tree(fd: int, info, where: str):
    return parse_record(fd, info.offset, info.length, where)


def _parse_file_chunks(ckpt: str, file: str, wanted: List[tuple]):
    """TensorRefs of the records ``wanted`` = [(key, offsets, offset, length)] of one .distcp file."""
    path = os.path.join(ckpt, file)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SourceError(f"{path} is named by .metadata but does not exist (incomplete copy?)") from None
    try:
        size = os.fstat(fd).st_size
        out = []
        for key, offsets, off, length in wanted:
            if off + length > size:
                raise SourceError(f"{path} is truncated: {key} at {list(offsets)} needs bytes up to "
                                  f"{off + length}, the file has {size}")
            out.append(parse_record(fd, off, length, f"{path} ({key} at {list(offsets)})"))
        return out
    finally:
        os.close(fd)


def read_common(ckpt: str, md, storage) -> dict:
    """The common state: the DCP byte entry ``common_state/shard_0_1`` or ``common.pt``."""
    if COMMON_KEY in md.state_dict_metadata:
        info = storage[(COMMON_KEY, ())]
        path = os.path.join(ckpt, info.relative_path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SourceError(f"{path} is named by .metadata but does not exist (incomplete copy?)") from None
        try:
            obj = parse_record(fd, info.offset, info.length, f"{path} ({COMMON_KEY})")
        finally:
            os.close(fd)
        return obj[0] if isinstance(obj, list) and obj else obj
    if os.path.isfile(os.path.join(ckpt, "common.pt")):
        return parse_file(os.path.join(ckpt, "common.pt"))
    raise SourceError(f"{ckpt}: no common state ({COMMON_KEY} in .metadata, or common.pt): "
                      "cannot tell the architecture")


def read_metadata(ckpt: str):
    path = os.path.join(ckpt, ".metadata")
    try:
        with open(path, "rb") as f:
            md = restricted_loads(f.read())
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise SourceError(f"{path} cannot be read ({type(e).__name__}: {e}); truncated or not DCP?") from None
    if not hasattr(md, "state_dict_metadata"):
        raise SourceError(f"{path} is not DCP metadata")
    storage = {(k.fqn, tuple(k.offset) if k.offset is not None else ()): v for k, v in md.storage_data.items()}
    return md, storage


def _entry_lookup(spec: ModelSpec, table: MappingTable):
    """Top-level key -> entry; layer-relative key -> ``[entry]`` (one per expert for experts).
    Every spelling is accepted: TE names, local-spec names, the aliases written alongside."""
    top = {e.mcore: e for e in table.top if e.applies(spec)}
    layer: Dict[str, list] = {}
    for key, entries in layer_groups(spec, table):
        e = entries[0]
        for name in (key, e.mcore if e.expert is None else None, e.local) + tuple(e.aliases):
            if name:
                layer.setdefault(name, entries)
    return top, layer


_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def read_index(root: str, iteration: Optional[int] = None, vocab_size: Optional[int] = None) -> SourceIndex:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt, it = mg.checkpoint_dir(root, iteration, _is_dcp_dir)
    mj = os.path.join(ckpt, "metadata.json")
    if os.path.isfile(mj):
        with open(mj) as f:
            backend = json.load(f).get("sharded_backend")
        if backend not in ("torch_dist", None):
            raise SourceError(f"{mj}: sharded_backend={backend!r}; only torch_dist is read")
    md, storage = read_metadata(ckpt)
    common = read_common(ckpt, md, storage)
    spec = mg.spec_from_common(common, ckpt, vocab_size)
    table = table_for(spec)
    top, layer = _entry_lookup(spec, table)
    L = spec.num_layers
    glob = Layout(tp=1)
    problems, plan = [], []  # plan: (key, [entries], layers, stacked, TensorStorageMetadata)
    for key, meta in sorted(md.state_dict_metadata.items()):
        if isinstance(meta, BytesStorageMetadata):
            if key == COMMON_KEY or "_extra_state" in key or key.startswith(OPTIONAL_PREFIXES):
                continue
            problems.append(f"unknown object {key}")
            continue
        if key.startswith(OPTIONAL_PREFIXES):
            continue  # optimizer state and RNG: not model weights, not converted
        m = _PER_LAYER.match(key)
        if key in top:
            es, layers, stacked = [top[key]], [None], False
        elif key.startswith(STACK_PREFIX) and key[len(STACK_PREFIX):] in layer:
            es, layers, stacked = layer[key[len(STACK_PREFIX):]], list(range(L)), True
        elif m and m.group(2) in layer:
            es, layers, stacked = layer[m.group(2)], [int(m.group(1))], False
        else:
            problems.append(f"unknown tensor {key} (refusing to drop it silently)")
            continue
        e = es[0]
        shape = tuple(meta.size)
        exp = e.shape(spec, glob)
        if e.tp_rule == "vocab":
            exp = (shape[0],) + exp[1:] if shape[0] >= spec.vocab_size else exp
        if e.expert is not None:
            exp = (spec.num_experts,) + exp
        if stacked:
            exp = (L,) + exp
        if shape != exp:
            problems.append(f"{key} has global shape {shape}, the architecture implies {exp}")
            continue
        plan.append((key, es, layers, stacked, meta))
    # A tensor written under several spellings (the MoE pre-MLP norm) is read from one of them.
    seen, kept = set(), []
    for item in plan:
        key, es, layers = item[:3]
        if all((id(e), i) in seen for e in es for i in layers):
            continue
        seen |= {(id(e), i) for e in es for i in layers}
        kept.append(item)
    plan = kept
    missing = [(e, i) for e, i in table.entries(spec) if (id(e), i) not in seen]
    for e, i in missing:
        if e.expert is None:
            problems.append(f"{STACK_PREFIX + e.dist_key if i is not None else e.mcore}"
                            f"{'' if i is None else f' (layer {i})'} is absent")
    if any(e.expert is not None for e, _ in missing):
        keys = sorted({STACK_PREFIX + e.dist_key for e, _ in missing if e.expert is not None})
        experts = sorted({(i, e.expert) for e, i in missing if e.expert is not None})
        problems.append(f"{', '.join(keys)} absent: missing experts "
                        + ", ".join(f"layer {i} expert {x}" for i, x in experts[:20]))
    if problems:
        raise SourceError(f"{ckpt} does not match its architecture ({spec.model_type}, {L} layers):\n  - "
                          + "\n  - ".join(problems[:20]))
    # Every chunk's record, parsed (headers only) by the ranks in turn, file by file.
    wanted: Dict[str, List[tuple]] = {}
    for key, es, layers, stacked, meta in plan:
        for ch in meta.chunks:
            info = storage.get((key, tuple(ch.offsets)))
            if info is None:
                raise SourceError(f"{ckpt}/.metadata: chunk {list(ch.offsets)} of {key} has no storage entry")
            wanted.setdefault(info.relative_path, []).append((key, tuple(ch.offsets), info.offset, info.length))
    files = sorted(wanted)
    refs = dict(zip(files, rdist.map_shared(lambda f: _parse_file_chunks(ckpt, f, wanted[f]), files)))
    where = {}
    for f in files:
        for (key, offsets, _, _), ref in zip(wanted[f], refs[f]):
            where[(key, offsets)] = (f, ref)
    slices: Dict[str, List[SourceSlice]] = defaultdict(list)
    dtypes: Dict[str, torch.dtype] = {}
    rel = os.path.relpath(ckpt, root)
    for key, es, layers, stacked, meta in plan:
        axes = (1 if stacked else 0) + (1 if es[0].expert is not None else 0)  # leading layer/expert axes
        rows = meta.size[axes]
        for ch in meta.chunks:
            f, ref = where[(key, tuple(ch.offsets))]
            if not isinstance(ref, TensorRef) or tuple(ref.shape) != tuple(ch.sizes) or not ref.contiguous:
                raise SourceError(f"{ckpt}/{f}: the record of {key} at {list(ch.offsets)} is not the "
                                  f"contiguous {tuple(ch.sizes)} tensor .metadata promises")
            st = StoredTensor(os.path.normpath(os.path.join(rel, f)), f"{key}@{list(ch.offsets)}",
                              tuple(ch.sizes), ref.dtype, ref.offset)
            c_lo, c_sz = tuple(ch.offsets), tuple(ch.sizes)
            ls = layers if not stacked else range(c_lo[0], c_lo[0] + c_sz[0])
            xs = [None] if es[0].expert is None else range(c_lo[axes - 1], c_lo[axes - 1] + c_sz[axes - 1])
            for i in ls:
                for x in xs:
                    e = es[0] if x is None else es[x]
                    lead = ((i,) if stacked else ()) + (() if x is None else (x,))
                    for pl in mg.local_placements(e, spec, glob, 0, i, lead=lead, reading=True, rows=rows):
                        sl = _slice_in_chunk(st, pl, len(lead), c_lo, c_sz)
                        if sl is not None:
                            slices[pl.canonical].append(sl)
                            dtypes[pl.canonical] = ref.dtype
    shapes = {n: e.part_shape(spec, role) for n, (e, role, _) in table.canonical_names(spec).items()}
    sizes = {os.path.normpath(os.path.join(rel, f)): os.path.getsize(os.path.join(ckpt, f)) for f in files}
    index = SourceIndex(NAME, root, spec, shapes, dtypes, dict(slices), sizes, it)
    index.guessed = mg.GUESSED_FROM_ARGS if mg.spec_is_guessed(common) else ()
    index.source_layout = mg.layout_of_common(common, spec) if "args" in common or "reshard" in common else None
    return index


def _slice_in_chunk(st: StoredTensor, pl: Placement, n: int, c_lo, c_sz) -> Optional[SourceSlice]:
    """The part of placement ``pl`` (``n`` leading layer/expert axes) inside the DCP chunk
    ``[c_lo, c_lo+c_sz)`` stored as ``st``, or None when they do not meet."""
    d_sz = (1,) * n + tuple(pl.c_size)
    lo = tuple(max(a, b) for a, b in zip(pl.dst_off, c_lo))
    hi = tuple(min(a + x, b + y) for a, x, b, y in zip(pl.dst_off, d_sz, c_lo, c_sz))
    if any(h <= q for q, h in zip(lo, hi)):
        return None
    c_off = tuple(c + (q - d) for c, q, d in zip(pl.c_off, lo[n:], pl.dst_off[n:]))
    return SourceSlice(st, c_off, tuple(q - c for q, c in zip(lo, c_lo)), tuple(h - q for q, h in zip(lo[n:], hi[n:])))


class Reader(RawReader):
    """A DCP chunk is a torch.save record whose storage bytes sit at a known file offset."""


# ------------------------------------------------------------------------- target tensors

def _placements(entry, spec, layout, layer: Optional[int]) -> List[Placement]:
    out = []
    lead = (() if layer is None else (layer,)) + (() if entry.expert is None else (entry.expert,))
    for seg in entry.segments(spec, layout):
        name = entry.parts()[seg.part]
        name = name.format(i=layer) if layer is not None else name
        rest = entry.part_shape(spec, seg.part)[1:]
        zeros = (0,) * len(rest)
        out.append(Placement(name, (seg.src_row,) + zeros, (seg.rows,) + rest,
                             lead + (seg.dst_row,) + zeros, seg.repeat))
    return out


def layer_groups(spec: ModelSpec, table: MappingTable) -> List[tuple]:
    """``(dist key, [entries])`` of the stacked layer tensors: one entry, or one per expert
    (``[L, E, ...]``), in table order."""
    groups: Dict[str, list] = {}
    for e in table.layer:
        if e.applies(spec):
            groups.setdefault(e.dist_key, []).append(e)
    return list(groups.items())


def targets(spec: ModelSpec, layout: Layout, table: MappingTable,
            dtype_of: Callable[[str], torch.dtype]) -> List[TargetTensor]:
    """The global tensors of a homogeneous GPT model, stacked on the layer axis (and the expert
    axis for expert tensors). Each expert is its own placements: no expert stack is built."""
    out = []
    for e in table.top:
        if e.applies(spec):
            pls = _placements(e, spec, layout, None)
            out.append(TargetTensor(e.mcore, e.shape(spec, layout), _one_dtype(pls, dtype_of, e.mcore), pls,
                                    rule=e.tp_rule))
    for dist_key, entries in layer_groups(spec, table):
        e = entries[0]
        pls = [p for i in range(spec.num_layers) for x in entries for p in _placements(x, spec, layout, i)]
        lead = (spec.num_layers,) + ((spec.num_experts,) if e.expert is not None else ())
        for key in (dist_key,) + tuple(e.aliases):
            key = STACK_PREFIX + key
            out.append(TargetTensor(key, lead + e.shape(spec, layout), _one_dtype(pls, dtype_of, key), pls,
                                    rule=e.tp_rule))
    return out


def _one_dtype(pls, dtype_of, key) -> torch.dtype:
    dts = {dtype_of(p.canonical) for p in pls}
    if len(dts) != 1:
        raise AssertionError(f"{key} would mix dtypes {sorted(map(str, dts))}")
    return dts.pop()


def extra_state_keys(spec: ModelSpec, table: MappingTable) -> List[str]:
    """``<module>._extra_state/shard_{layer}_{L}`` for every linear Megatron checkpoints."""
    L, E = spec.num_layers, spec.num_experts
    out = []
    for e in table.layer:
        if not (e.extra_state and e.applies(spec)):
            continue
        if e.expert is None:
            out += [f"{STACK_PREFIX}{e.extra_state}._extra_state/shard_{i}_{L}" for i in range(L)]
        else:  # experts: one object per (layer, expert)
            module = e.dist_key.rsplit(".", 1)[0]
            out += [f"{STACK_PREFIX}{module}._extra_state/shard_{i}.{e.expert}_{L}.{E}" for i in range(L)]
    return out


def layout_writers(spec: ModelSpec, layout: Layout, world: int):
    """Writers that mirror the target layout: the piece goes to the rank that would hold it
    in a Megatron job at that layout (virtual rank ``pp_stage*S + tp_rank``, experts
    ``pp_stage*S + ep_rank*etp + etp_rank``, with ``S = max(tp, ep*etp)``; modulo N)."""
    etp, E = layout.expert_tp, spec.num_experts
    S = max(layout.tp, layout.ep * etp)
    stage = {}
    for p, chunks in enumerate(layout.stage_layers(spec.num_layers)):
        for layers in chunks:
            for i in layers:
                stage[i] = p

    def writers(piece: Piece, t: TargetTensor) -> Tuple[int, ...]:
        lead = len(piece.dst_off) - len(piece.size)
        row = piece.dst_off[lead]
        if t.key.startswith(STACK_PREFIX):
            pp = stage[piece.dst_off[0]]
        else:
            pp = 0 if t.key.startswith("embedding.") else layout.pp - 1
        rows = t.shape[lead]
        expert = lead == 2  # [L, E, ...]
        n = etp if expert else layout.tp
        if t.rule in ("column", "qkv", "vocab"):
            tp = row * n // rows
        elif t.rule == "gated":
            tp = (row % (rows // 2)) * n // (rows // 2)
        else:
            tp = 0
        if expert:
            tp += layout.expert_rank(piece.dst_off[1], E)[0] * etp
        return ((pp * S + tp) % world,)

    return writers


# ------------------------------------------------------------------------- writing

def _write_item(p: Piece, t: TargetTensor) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(p.key, torch.Size(p.dst_off)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(p.dst_off), sizes=torch.Size(p.dst_size)),
            properties=TensorProperties(dtype=t.dtype),
            size=torch.Size(t.shape),
        ),
    )


class _PiecePlanner(DefaultSavePlanner):
    """A save planner whose local plan is this rank's pieces (rectangles) and byte objects;
    tensors are resolved lazily, one at a time, while the file is written."""

    def __init__(self, items: List[WriteItem], resolve: Callable[[WriteItem], object]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items, self._resolve = items, resolve

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        return self._resolve(write_item)


@dataclass
class FileSpan:
    """A target piece whose bytes are exactly ``nbytes`` bytes of an open source file: the
    writer copies them file-to-file in the kernel (``copy_file_range``) instead of reading
    them into memory and writing them back. ``load`` reads them for real (the fallback)."""

    fd: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: Tuple[int, ...]
    load: Callable[[], torch.Tensor]


_KERNEL_COPY = {"ok": hasattr(os, "copy_file_range")}
_NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM)


def _address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


class _SpanStream:
    """The file object torch.save writes a placeholder tensor to: when the placeholder's
    payload comes by (same address, same size), its bytes are copied from the source file
    instead; everything else (zip headers, pickle) goes to the file as usual."""

    def __init__(self, f, span: FileSpan, payload_ptr: int):
        self.f, self.span, self.ptr, self.used = f, span, payload_ptr, False
        self.kernel_bytes = 0

    def write(self, b) -> int:
        m = memoryview(b).cast("B")
        if not self.used and m.nbytes == self.span.nbytes and _address(m) == self.ptr:
            self.used = True
            self._copy()
            return m.nbytes
        return self.f.write(m)

    def _copy(self) -> None:
        sp, f = self.span, self.f
        f.flush()
        pos, done = f.tell(), 0
        while done < sp.nbytes and _KERNEL_COPY["ok"]:
            try:
                n = os.copy_file_range(sp.fd, f.fileno(), sp.nbytes - done, sp.offset + done, pos + done)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                _KERNEL_COPY["ok"] = False  # e.g. across file systems: use plain reads from now on
                break
            if n == 0:
                raise OSError(errno.EIO, "source file ended during copy (truncated while running?)")
            done += n
        self.kernel_bytes = done
        f.seek(pos + done)
        while done < sp.nbytes:
            chunk = os.pread(sp.fd, min(64 << 20, sp.nbytes - done), sp.offset + done)
            if not chunk:
                raise OSError(errno.EIO, "source file ended during copy (truncated while running?)")
            f.write(chunk)
            done += len(chunk)

    def flush(self):
        self.f.flush()

    def __getattr__(self, name):
        return getattr(self.f, name)


class _StreamingWriter(FileSystemWriter):
    """FileSystemWriter that streams items to one file per rank and drops each tensor as soon
    as it is written (the stock writer keeps every tensor of a file alive until the end)."""

    def __init__(self, path: str, fsync: bool, on_bytes: Callable[[int, int], None]):
        super().__init__(path, single_file_per_rank=True, sync_files=fsync, thread_count=1, overwrite=True)
        self._fsync, self._on_bytes = fsync, on_bytes
        self._scratch = None  # address space for placeholders; never written, so never resident

    def write_data(self, plan: SavePlan, planner) -> Future:
        name = f"{plan.storage_data.prefix}0.distcp"
        results = []
        with open(os.path.join(str(self.path), name), "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                elif isinstance(data, FileSpan):
                    self._on_bytes(data.nbytes, self._save_span(stream, data))
                else:
                    data = _exact_storage(data.detach().cpu())
                    torch_save(data, stream, stream.name)
                    self._on_bytes(data.nbytes, 0)
                length = stream.tell() - offset
                faults.point("write")
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, offset, length)))
                del data
            sync(stream, self._fsync)
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def _save_span(self, stream, span: FileSpan) -> int:
        """torch.save a placeholder (never touched memory) whose payload the stream copies from
        the source file; if torch.save did not write the payload in one piece, redo it with the
        real bytes, so the record is right either way. Returns the bytes the kernel copied."""
        crc = _crc_config()
        if crc is None or crc.save.compute_crc32:
            torch_save(_exact_storage(span.load()), stream, stream.name)  # a CRC needs the real bytes in memory
            return 0
        if self._scratch is None or self._scratch.numel() < span.nbytes:
            self._scratch = torch.empty(span.nbytes, dtype=torch.uint8)
        sub = self._scratch.untyped_storage()[0:span.nbytes]
        placeholder = torch.empty(0, dtype=span.dtype).set_(sub, 0, span.shape)
        start = stream.tell()
        s = _SpanStream(stream, span, placeholder.data_ptr())
        torch_save(placeholder, s, stream.name)
        if not s.used:
            stream.seek(start)
            stream.truncate()
            torch_save(_exact_storage(span.load()), stream, stream.name)
            return 0
        return s.kernel_bytes


def _exact_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` on a storage of exactly its own bytes: torch.save writes a tensor's whole storage,
    and pieces are often views into a larger read or receive buffer. No copy when contiguous."""
    if not t.is_contiguous():
        return t.contiguous()
    if t.untyped_storage().nbytes() == t.nbytes:
        return t
    start = t.storage_offset() * t.element_size()
    sub = t.untyped_storage()[start:start + t.nbytes]
    return torch.empty(0, dtype=t.dtype).set_(sub, 0, t.shape)


def _crc_config():
    """torch's serialization config when it can switch CRC32 off (torch >= 2.5), else None."""
    try:
        from torch.utils.serialization import config as cfg
    except ImportError:
        return None
    return cfg if hasattr(cfg.save, "compute_crc32") else None


@contextlib.contextmanager
def _no_crc32(enabled: bool = True):
    """Skip the zip CRC32 of every record torch.save writes (torch's own option; it halves the
    time of big records and lets payloads be copied without reading them). Checked here: DCP and
    Megatron-core read such files."""
    cfg = _crc_config()
    if cfg is None or not enabled:
        yield
        return
    old = cfg.save.compute_crc32
    cfg.save.compute_crc32 = False
    try:
        yield
    finally:
        cfg.save.compute_crc32 = old


def _bytes(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def write(ckpt_dir: str, rank: int, world: int, pieces: Sequence[Piece], tgts: Dict[str, TargetTensor],
          tensor_of: Callable[[Piece], torch.Tensor], extra_keys: Sequence[str], common: dict,
          fsync: bool = True, on_bytes: Callable[[int, int], None] = lambda n, k: None, fast: bool = True) -> None:
    """Collective: every rank writes its pieces; rank 0 adds the common state."""
    items: List[WriteItem] = []
    objects: Dict[str, object] = {}
    by_index = {}
    for p in pieces:
        it = _write_item(p, tgts[p.key])
        items.append(it)
        by_index[(p.key, tuple(p.dst_off))] = p
    for j, key in enumerate(extra_keys):
        if j % world == rank:
            objects[key] = [None]
    if rank == 0:
        objects[COMMON_KEY] = [common]
    items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in objects]

    def resolve(item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            return _bytes(objects[item.index.fqn])
        return tensor_of(by_index[(item.index.fqn, tuple(item.index.offset))])

    try:
        with _no_crc32(fast):
            dcp.save({}, storage_writer=_StreamingWriter(ckpt_dir, fsync, on_bytes),
                     planner=_PiecePlanner(items, resolve))
    except CheckpointException as e:  # a BaseException in torch: turn it into an ordinary error
        raise _write_failure(e, ckpt_dir, sum(p.written_nbytes for p in pieces)) from None
    if rank == 0:
        with open(os.path.join(ckpt_dir, "metadata.json"), "w") as f:
            json.dump(METADATA_JSON, f)


def _write_failure(e: CheckpointException, ckpt_dir: str, needed: int) -> Exception:
    """DCP's collected failures (each an exception, or an (exception, stack) pair) as one line:
    no space, a lost peer, or each rank's cause - never the stack frames."""
    causes = {}
    for r, x in sorted(e.failures.items()):
        causes[r] = x[0] if isinstance(x, tuple) and x and isinstance(x[0], BaseException) else x
    for r, x in causes.items():
        if is_no_space(x):
            return space_error(x, r, needed, ckpt_dir)
    for r, x in causes.items():
        if isinstance(x, ReshardError):
            return x
        if isinstance(x, BaseException) and is_lost_peer(x):
            return lost_peer("writing the torch_dist files", r, x)
    text = "; ".join(f"rank {r}: {type(x).__name__}: {str(x).strip().splitlines()[0] if str(x).strip() else ''}"
                     for r, x in causes.items())
    return WriteError(f"writing {ckpt_dir} failed ({text}); nothing was committed")


def load_full(ckpt_dir: str):
    """``(tensors, objects)`` of a DCP checkpoint as full tensors, with plain
    torch.distributed.checkpoint in this process (for checks and small checkpoints)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    reader = dcp.FileSystemReader(ckpt_dir)
    md = reader.read_metadata()
    state = {}
    for k, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            state[k] = torch.empty(m.size, dtype=m.properties.dtype)
        elif isinstance(m, BytesStorageMetadata):
            state[k] = io.BytesIO()
    dcp.load(state, storage_reader=reader, no_dist=True)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    objects = {}
    for k, v in state.items():
        if k in tensors:
            continue
        if isinstance(v, io.BytesIO):  # the default planner usually torch.loads byte entries itself
            v.seek(0)
            v = torch.load(v, weights_only=False)
        objects[k] = v
    return tensors, objects
