"""DCP's ``.metadata`` records, read without importing ``torch.distributed.checkpoint``.

Importing DCP costs about a second per process (its DTensor import pulls in sympy), and a job
that only *reads* a torch_dist checkpoint needs none of it: ``.metadata`` is a plain pickle of
a few data classes. The restricted unpickler (:mod:`reshard.formats.torchzip`) builds these
stand-ins in their place. They carry the same fields under the same names (checked against
torch 2.6-2.14's ``torch/distributed/checkpoint/metadata.py`` and ``filesystem.py``) and accept
the states those classes pickle: a field dict (dataclasses; ``_StorageInfo`` leaves out fields
that are None) or, for ``TensorProperties``, its ``__getstate__`` tuple.
"""

from __future__ import annotations

import enum

import torch


class _Record:
    """A pickled dataclass: fields from the state dict over the defaults."""

    _defaults: dict = {}

    def __init__(self, **kw):
        self.__dict__.update(self._defaults)
        self.__dict__.update(kw)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        self.__dict__.update(self._defaults)
        self.__dict__.update(state)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


class Metadata(_Record):
    _defaults = {"planner_data": None, "storage_data": None, "storage_meta": None, "version": None}


class TensorStorageMetadata(_Record):
    pass


class BytesStorageMetadata(_Record):
    pass


class ChunkStorageMetadata(_Record):
    pass


class MetadataIndex(_Record):
    _defaults = {"offset": None, "index": None}


class StorageMeta(_Record):
    _defaults = {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": []}


class _StorageInfo(_Record):
    _defaults = {"transform_descriptors": None}


class _MEM_FORMAT_ENCODING(enum.Enum):
    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


class TensorProperties(_Record):
    _defaults = {"dtype": torch.float32, "layout": torch.strided, "requires_grad": False,
                 "memory_format": torch.contiguous_format, "pin_memory": False}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5:  # DCP's own __getstate__
            dtype, layout, requires_grad, _mem, pin = state
            state = {"dtype": dtype, "layout": layout, "requires_grad": requires_grad, "pin_memory": pin}
        super().__setstate__(state)


CLASSES = {c.__name__: c for c in (Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata,
                                    MetadataIndex, StorageMeta, _StorageInfo, _MEM_FORMAT_ENCODING,
                                    TensorProperties)}
