"""The target side of a format: the verbs the engine calls, in this order.

On every rank, metadata only (the same answer everywhere):

1. ``check()`` - refuse what the format cannot hold (raise :class:`~reshard.errors.LayoutError`);
2. ``tensors()`` - the target tensors and where canonical rectangles land in them;
3. ``writers(tensors, world)`` - which rank(s) store each piece (None: the rank that reads it),
   and ``read_by_writer`` - whether each piece is read by its writer, so nothing moves;
4. ``common(dtype)`` - the common state (args, layout) the output records; ``subdir`` - where
   the checkpoint lies inside the output directory.

Then, with data:

5. ``write(job, out_dir, rank, world, pieces, source, wrote)`` - collective: every rank writes
   its pieces; a failure on any rank fails every rank the same way;
6. ``side_files(job, out_dir)`` - rank 0, after every rank wrote: what the directory needs
   besides tensors (config.json, the index, params.json, metadata.json);
7. ``finish(job, stage)`` - rank 0, after verification, just before the commit (trackers).

Reading the output back (verification) uses the format's source verbs: the output is
re-read as any checkpoint of that format would be.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .. import dist as rdist
from .. import faults
from ..layout import Layout
from ..spec import ModelSpec
from ..types import TargetTensor
from . import files


@dataclass
class Context:
    """What a target needs to know of one conversion before any data moves."""

    spec: ModelSpec
    layout: Layout
    table: object
    dtype_of: Callable[[str], torch.dtype]
    cfg: object  # the whole job config (target.*, io.*)
    index: object  # the source's SourceIndex
    source: str
    world: int
    optimizer: Optional[dict] = None  # the source's optimizer state, when it is carried (reshard/optim.py)


class Target:
    name = ""
    ckpt_format = "torch_dist"  # what the common state's args record (Megatron's --ckpt-format)
    read_by_writer = False
    subdir = ""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.io = ctx.cfg.io

    def check(self) -> None:
        pass

    def tensors(self) -> List[TargetTensor]:
        raise NotImplementedError

    def writers(self, tensors: List[TargetTensor], world: int):
        return None

    def common(self, dtype: torch.dtype) -> dict:
        from .megatron_args import common_state

        c, p = self.ctx.cfg, self.ctx
        return common_state(p.spec, p.layout, dtype, self.ckpt_format, c.target.iteration, c.target.transformer_impl,
                            {"format": p.index.format, "path": p.source}, c.target.moe_grouped_gemm)

    def write(self, job, out_dir: str, rank: int, world: int, pieces, source, wrote) -> None:
        raise NotImplementedError

    def side_files(self, job, out_dir: str) -> None:
        pass

    def finish(self, job, stage: str) -> None:
        pass

    @property
    def chunk(self) -> int:
        return int(float(self.io.write_chunk_mb) * 2**20)


class FileTarget(Target):
    """Formats of whole files, each written by one rank (legacy, hf, meta): a rank writes its
    files one at a time through a :class:`~reshard.formats.files.Sink`, one tensor in memory at a
    time; subclasses say what one file is (:meth:`write_file`)."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.read_by_writer = self.io.assign == "auto"

    def writers(self, tensors, world):
        return files.writers_by_file(tensors, world)

    def write(self, job, out_dir, rank, world, pieces, source, wrote) -> None:
        err, syncer = None, files.Syncer(self.io.fsync)
        try:
            emitter = files.Emitter(source.payload)
            for file, items in files.by_file(pieces, job.plan.targets):
                path = os.path.join(out_dir, file)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                sink = files.Sink(path, self.chunk, writeback=self.io.fsync)
                try:
                    kernel = self.write_file(job, sink, file, items, emitter)
                    faults.point("write")
                except BaseException:
                    sink.close()
                    raise
                syncer.submit(sink)  # fsynced and closed in the background while the next file is written
                wrote(sum(t.nbytes for t, _ in items), kernel)
        except Exception as e:  # no collective inside: the verdict below keeps ranks in step
            err = e
        finally:
            try:
                syncer.join()
            except Exception as e:
                err = err or e
        if err is not None:
            err = job.translate(err, "writing the target files", rank, out_dir)
        rdist.agree(err, "writing the target files")

    def write_file(self, job, sink: "files.Sink", file: str, items, emitter: "files.Emitter") -> int:
        """Write one file's tensors (``items``: ``[(TargetTensor, [Piece])]``) into ``sink``;
        returns the bytes the kernel copied."""
        raise NotImplementedError


class TorchSaveTarget(FileTarget):
    """Whole files written with ``torch.save`` (legacy, Meta): the file's object is built around
    placeholders whose bytes are emitted as torch's zip writer reaches them
    (:func:`~reshard.formats.files.save_streamed`). With ``io.crc32=true`` (the CRC needs the
    bytes in memory) the file's tensors are assembled first and saved as they are."""

    def obj(self, job, file: str, tensors: dict) -> object:
        """The object saved as ``file``, given its tensors by name."""
        raise NotImplementedError

    def write_file(self, job, sink, file, items, emitter) -> int:
        names = [t.name for t, _ in items]
        if not self.io.crc32:
            payloads = [files.Payload(t.dtype, tuple(t.shape), t.nbytes,
                                      lambda s, t=t, ps=ps: emitter.emit(s, t, ps)) for t, ps in items]
            with files.crc32(False):
                got = files.save_streamed(lambda hs: self.obj(job, file, dict(zip(names, hs))), payloads, sink)
            if got is not None:
                return got
        tensors = {t.name: emitter.build(t, ps) for t, ps in items}
        with files.crc32(self.io.crc32):
            files.torch_save(self.obj(job, file, tensors), sink, sink.name)
        return 0
