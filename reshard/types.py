"""The plan's vocabulary, shared by the planner, the engine and every format: what a source
holds (:class:`StoredTensor`, :class:`SourceSlice`, :class:`SourceIndex`), what a target is made
of (:class:`TargetTensor`, :class:`Placement`) and what moves (:class:`Piece`). No I/O, no
imports of the engine or of any format: both sides import this module, never each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .spec import ModelSpec

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
    """Canonical rectangle ``[c_off, c_off+size)`` is stored at ``s_off`` of ``stored``.

    ``s_off`` may have leading dimensions the canonical tensor lacks (a stacked layer axis,
    size 1 there). ``transform`` names a row permutation the stored rows carry relative to
    the canonical ones, applied per block of ``transform[1]`` stored rows counted from row 0
    of ``stored`` (Meta's RoPE order: ``("rope_meta_to_hf", head_dim)``); ``TRANSPOSE``; or
    ``(FP8_BLOCKS, BlockScales)``: stored FP8 values dequantized by their block scales on read.
    """

    stored: StoredTensor
    c_off: Shape
    s_off: Shape
    size: Shape
    transform: Optional[Tuple[str, object]] = None


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
    source_layout: Optional[object] = None  # the Layout a Megatron source was saved at
    guessed: Tuple[str, ...] = ()  # spec fields the format cannot record (a preset may set them)
    # stored tensors the format's own index does not name (file -> names): never read, always reported
    unlisted: Dict[str, List[str]] = field(default_factory=dict)
    # what the source holds besides the weights and no target of this version carries (optimizer and RNG
    # state, ...): kind -> {"entries": n, "bytes": tensor bytes, "where": how the format stores it}; named in
    # the log, reshard_report.json and inspect
    not_carried: Dict[str, dict] = field(default_factory=dict)
    # optimizer state read as shadow tensors (reshard/optim.py): {"kinds": [...], "sharding": str,
    # "state": the optimizer's non-tensor state (param groups, step)}; None: the source has none this
    # version reads
    optimizer: Optional[dict] = None
    vocab_rows: Optional[int] = None  # a Megatron source's padded vocab, as stored (its rows past the vocab: padding)

    @property
    def total_bytes(self) -> int:
        """Bytes of canonical data in the source (what a conversion reads)."""
        total = 0
        for sl in self.slices.values():
            for s in sl:
                n = s.stored.dtype.itemsize
                for x in s.size:
                    n *= x
                total += n
        return total


def contiguous_start(shape: Shape, index: Shape) -> int:
    """Element offset of ``index`` in a C-order tensor of ``shape``."""
    start, stride = 0, 1
    for o, n in zip(reversed(index), reversed(shape)):
        start += o * stride
        stride *= n
    return start


def contiguous_run(shape: Shape, offsets: Shape, sizes: Shape) -> Optional[Tuple[int, int]]:
    """``(first element, numel)`` when the rectangle is one contiguous run of a C-order
    tensor of ``shape``, else None."""
    d = 0
    while d < len(sizes) - 1 and sizes[d] == 1:
        d += 1
    for e in range(d + 1, len(sizes)):
        if offsets[e] != 0 or sizes[e] != shape[e]:
            return None
    return contiguous_start(shape, offsets), math.prod(sizes)


TRANSPOSE = ("transpose", 0)  # a 2-D slice stored transposed (Megatron's old GroupedMLP weight1/weight2)


@dataclass(frozen=True)
class BlockScales:
    """A block-scaled FP8 weight's scales (``<name>_scale_inv``, ``[ceil(R/br), ceil(C/bc)]`` fp32):
    the value of element ``(r, c)`` is ``fp8[r, c].float() * scale[r // br, c // bc]``. As a slice's
    ``transform`` (``(FP8_BLOCKS, BlockScales)``) it makes every read of the slice dequantize."""

    scale: StoredTensor
    block: Tuple[int, int]


FP8_BLOCKS = "fp8_blocks"


def stored_offset(s_off, c_delta, transform=None) -> Shape:
    """``s_off`` moved by ``c_delta`` canonical elements (swapped for a transposed slice)."""
    lead = len(s_off) - len(c_delta)
    if transform == TRANSPOSE:
        c_delta = tuple(reversed(c_delta))
    return tuple(s_off[:lead]) + tuple(s + d for s, d in zip(s_off[lead:], c_delta))


def stored_size(size, transform=None) -> Shape:
    return tuple(reversed(size)) if transform == TRANSPOSE else tuple(size)


@dataclass(frozen=True)
class Placement:
    """Canonical rectangle ``[c_off, c_off+c_size)`` lands at ``dst_off`` of a target tensor.

    ``dst_off`` may have leading dimensions the canonical tensor lacks (the stacked layer axis
    of torch_dist); they have size 1. ``repeat`` > 1 broadcasts a one-row rectangle over
    ``repeat`` rows (vocab padding).
    """

    canonical: str
    c_off: Shape
    c_size: Shape
    dst_off: Shape
    repeat: int = 1

    @property
    def lead(self) -> int:
        return len(self.dst_off) - len(self.c_off)


@dataclass
class TargetTensor:
    key: str
    shape: Shape
    dtype: torch.dtype
    placements: List[Placement]
    rule: str = "replicated"  # TP split rule of the mapping entry (see reshard/mapping.py)
    file: Optional[str] = None  # file-per-tensor-set formats: the file (relative) that stores it
    name: Optional[str] = None  # ... and its name inside that file
    transform: Optional[Tuple[str, int]] = None  # row permutation applied to the assembled tensor

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


@dataclass
class Piece:
    id: int
    canonical: str
    stored: StoredTensor
    s_off: Shape
    size: Shape
    key: str
    dst_off: Shape
    dtype: torch.dtype  # target dtype (cast at the reader)
    repeat: int = 1
    reader: int = -1
    writers: Tuple[int, ...] = ()
    round: int = -1
    transform: Optional[Tuple[str, int]] = None  # row permutation of the stored rows (SourceSlice.transform)
    c_off: Shape = ()  # where the piece lies in its canonical tensor

    @property
    def s_size(self) -> Shape:
        """The rectangle of the stored tensor (with its leading axes, if any)."""
        return (1,) * (len(self.s_off) - len(self.size)) + stored_size(self.size, self.transform)

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    @property
    def src_nbytes(self) -> int:
        return self.numel * self.stored.dtype.itemsize

    @property
    def out_nbytes(self) -> int:
        """Bytes that travel (cast, before the repeat)."""
        return self.numel * self.dtype.itemsize

    @property
    def written_nbytes(self) -> int:
        """Bytes this piece puts into the target (cast, after the repeat)."""
        return self.out_nbytes * self.repeat

    @property
    def dst_size(self) -> Shape:
        lead = len(self.dst_off) - len(self.size)
        return (1,) * lead + (self.size[0] * self.repeat,) + tuple(self.size[1:])
