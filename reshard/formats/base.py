"""What every format provides, and the source index the planner works from.

A format module offers the same verbs (DESIGN.md "Format"):

* ``detect(path) -> bool`` - is this directory in my format (metadata only)?
* ``read_index(path, ...) -> SourceIndex`` - spec and where every canonical tensor lives.
* a reader: ``read(stored, offsets, sizes) -> Tensor`` for one rectangle of a stored tensor,
  and ``span(stored, offsets, sizes) -> (fd, offset, nbytes) | None`` when that rectangle is
  one run of raw bytes in its file (the writer may then copy it without reading it).
* a writer: ``targets(...)`` (the target tensors and how canonical rectangles land in
  them), and ``write(...)`` run collectively by every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..spec import ModelSpec

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as stored in one source file."""

    file: str  # path relative to the source root
    key: str  # name inside the file
    shape: Shape
    dtype: torch.dtype
    offset: int = 0  # byte offset of its data in the file (read ordering and locality)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SourceSlice:
    """Canonical rectangle ``[c_off, c_off+size)`` is stored at ``s_off`` of ``stored``."""

    stored: StoredTensor
    c_off: Shape
    s_off: Shape
    size: Shape


@dataclass
class SourceIndex:
    """Metadata of a source checkpoint: no tensor data."""

    format: str
    root: str
    spec: ModelSpec
    shapes: Dict[str, Shape]  # canonical name -> canonical shape
    dtypes: Dict[str, torch.dtype]
    slices: Dict[str, List[SourceSlice]]  # canonical name -> where its pieces are
    files: Dict[str, int] = field(default_factory=dict)  # relative file -> size in bytes
    iteration: Optional[int] = None

    @property
    def total_bytes(self) -> int:
        return sum(s.stored.nbytes for sl in self.slices.values() for s in sl
                   if s.size == s.stored.shape)
