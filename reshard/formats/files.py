"""Formats made of whole files, each written by one rank (Megatron legacy, HF safetensors,
Meta consolidated): which rank writes which file, and assembling a file's tensors from the
pieces the plan delivers.

A rank assembles one file at a time - its tensors in memory, filled piece by piece, then
serialised - so its peak is about its largest file plus what it received, never the model.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .. import faults
from ..plan import Piece, TargetTensor
from ..transforms import ROW_PERMUTATIONS


def file_owners(tgts: Sequence[TargetTensor], world: int) -> Dict[str, int]:
    """Files to ranks, largest first to the least-loaded rank (deterministic): every rank writes
    about the same bytes, and a file is never split between ranks."""
    size: Dict[str, int] = defaultdict(int)
    for t in tgts:
        n = t.dtype.itemsize
        for s in t.shape:
            n *= s
        size[t.file] += n
    load = [0] * world
    owners = {}
    for f in sorted(size, key=lambda f: (-size[f], f)):
        r = min(range(world), key=lambda i: (load[i], i))
        owners[f] = r
        load[r] += size[f]
    return owners


def writers_by_file(tgts: Sequence[TargetTensor], world: int) -> Callable[[Piece, TargetTensor], Tuple[int, ...]]:
    owners = file_owners(tgts, world)
    return lambda piece, t: (owners[t.file],)


def assemble_lazy(pieces: Sequence[Piece], tgts: Dict[str, TargetTensor],
                  payload: Callable[[Piece], torch.Tensor]):
    """Yield ``(file, [(target, build)])`` for each file these pieces fill, one file at a time;
    ``build()`` assembles that one tensor (so a streaming writer holds one tensor at a time)."""
    by_file: Dict[str, Dict[str, List[Piece]]] = defaultdict(lambda: defaultdict(list))
    for p in pieces:
        by_file[tgts[p.key].file][p.key].append(p)

    def builder(key, ps):
        def build() -> torch.Tensor:
            t = tgts[key]
            buf = torch.empty(t.shape, dtype=t.dtype)
            for p in ps:
                idx = tuple(slice(o, o + s) for o, s in zip(p.dst_off, p.dst_size))
                src = payload(p)
                buf[idx] = src.reshape(p.dst_size) if src.shape != p.dst_size else src
                del src
            if t.transform is not None:
                buf = ROW_PERMUTATIONS[t.transform[0]](buf, t.transform[1])
            return buf
        return build

    for file in sorted(by_file):
        yield file, [(tgts[key], builder(key, ps)) for key, ps in by_file[file].items()]


def assemble(pieces: Sequence[Piece], tgts: Dict[str, TargetTensor], payload: Callable[[Piece], torch.Tensor]):
    """Yield ``(file, {name: tensor})`` for each file these pieces fill, one file at a time."""
    for file, items in assemble_lazy(pieces, tgts, payload):
        yield file, {t.name: build() for t, build in items}


class _RecordingFile:
    """A file object for ``torch.save`` that keeps the OSError of a failed write: torch's zip
    writer reports any short write as ``unexpected pos`` and loses the cause (ENOSPC, EIO)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def torch_save(obj, f, path: str) -> None:
    """``torch.save(obj, f)``; a failed write raises its own OSError, naming ``path``."""
    rec = _RecordingFile(f)
    try:
        torch.save(obj, rec)
    except (OSError, RuntimeError) as e:
        cause = rec.error or (e if isinstance(e, OSError) else None)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, cause.filename or path) from e


def sync(f, fsync: bool) -> None:
    """Flush ``f`` and, when asked, fsync it (the ``fsync`` failpoint sits just before)."""
    if fsync:
        f.flush()
        faults.point("fsync")
        os.fsync(f.fileno())


def name_file(e: OSError, path: str) -> OSError:
    """``e`` with ``path`` as its file when the failing call did not say (a plain write())."""
    if e.filename is None:
        e.filename = path
    return e
