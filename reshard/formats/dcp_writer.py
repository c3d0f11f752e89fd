"""Writing a torch_dist checkpoint with torch.distributed.checkpoint: the only module that
imports DCP's save side (about a second of start-up that no other job pays).

Each piece of the plan becomes one DCP chunk written by the rank that holds it: a save planner
whose local plan is this rank's pieces, and a storage writer that streams them to one file per
rank through a :class:`~reshard.formats.files.Sink` - unchanged bytes copied file to file in the
kernel, each tensor dropped as soon as it is written (the stock writer keeps every tensor of a
file alive until the end).
"""

from __future__ import annotations

import io
import os
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .. import faults
from ..errors import ReshardError, WriteError, is_lost_peer, is_no_space, lost_peer, space_error
from ..types import Piece, TargetTensor
from . import files


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


class _StreamingWriter(FileSystemWriter):
    """FileSystemWriter that streams items to one file per rank (see the module doc)."""

    def __init__(self, path: str, fsync: bool, on_bytes: Callable[[int, int], None], chunk: int, crc32: bool):
        super().__init__(path, single_file_per_rank=True, sync_files=fsync, thread_count=1, overwrite=True)
        self._fsync, self._on_bytes, self._chunk, self._crc32 = fsync, on_bytes, chunk, crc32

    def write_data(self, plan: SavePlan, planner) -> Future:
        name = f"{plan.storage_data.prefix}0.distcp"
        results = []
        with files.Sink(os.path.join(str(self.path), name), self._chunk, writeback=self._fsync) as sink:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = sink.tell()
                if item.type == WriteItemType.BYTE_IO:
                    sink.write(data.getbuffer())
                elif isinstance(data, files.FileSpan):
                    self._on_bytes(data.nbytes, self._save_span(sink, data))
                else:
                    data = files.exact_storage(data.detach().cpu())
                    files.torch_save(data, sink, sink.name)
                    self._on_bytes(data.nbytes, 0)
                length = sink.tell() - offset
                faults.point("write")
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, offset, length)))
                del data
            sink.sync(self._fsync)
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def _save_span(self, sink: files.Sink, span: files.FileSpan) -> int:
        """The record of a span: torch.save of a placeholder whose payload the kernel copies; with
        CRC32 on (the CRC needs the bytes in memory), or if torch.save did not hand the payload
        over in one piece, the real bytes. Returns the bytes the kernel copied."""
        if not self._crc32:
            payload = files.Payload(span.dtype, span.shape, span.nbytes, lambda s: s.copy(span))
            got = files.save_streamed(lambda hs: hs[0], [payload], sink)
            if got is not None:
                return got
        files.torch_save(files.exact_storage(span.load()), sink, sink.name)
        return 0


def _bytes(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def save(ckpt_dir: str, rank: int, world: int, pieces: Sequence[Piece], tgts: Dict[str, TargetTensor],
         tensor_of: Callable[[Piece], object], objects: Dict[str, object], fsync: bool,
         on_bytes: Callable[[int, int], None], chunk: int, crc32: bool) -> None:
    """Collective: every rank writes its pieces (``tensor_of`` gives a tensor or a FileSpan) and
    its byte ``objects``; DCP's coordinator writes ``.metadata``."""
    items: List[WriteItem] = []
    by_index = {}
    for p in pieces:
        it = _write_item(p, tgts[p.key])
        items.append(it)
        by_index[(p.key, tuple(p.dst_off))] = p
    items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in objects]

    def resolve(item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            return _bytes(objects[item.index.fqn])
        return tensor_of(by_index[(item.index.fqn, tuple(item.index.offset))])

    try:
        with files.crc32(crc32):
            dcp.save({}, storage_writer=_StreamingWriter(ckpt_dir, fsync, on_bytes, chunk, crc32),
                     planner=_PiecePlanner(items, resolve))
    except CheckpointException as e:  # a BaseException in torch: turn it into an ordinary error
        raise _write_failure(e, ckpt_dir, sum(p.written_nbytes for p in pieces)) from None


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
