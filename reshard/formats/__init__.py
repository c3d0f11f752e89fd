"""Every format behind one interface: a registry of format modules, imported when first used
(a job that neither reads nor writes torch_dist never imports torch.distributed.checkpoint).

A format module provides, as a **source** (DESIGN.md "Format"):

* ``NAME``; ``detect(path) -> bool`` (metadata only);
* ``read_index(path, iteration, vocab_size) -> SourceIndex``: the spec and where every canonical
  tensor lives;
* ``Reader(root)``: ``read(stored, offsets, sizes)`` of one rectangle and ``span(...)`` when that
  rectangle is one run of raw bytes (:class:`~reshard.formats.base.RawReader`);
* ``stored(path) -> [dict]``: every stored tensor, for ``reshard inspect``;

and as a **target** a ``Target`` class (:class:`~reshard.formats.target.Target`), whose verbs
the engine calls in a fixed order - the way DCP's ``StorageWriter`` documents its own - so that
the engine (:mod:`reshard.run`) never names a format.
"""

from __future__ import annotations

import importlib
import os

from ..errors import SourceError

# also the order in which detection tries them (fsdp_dtensor before torch_dist: both are DCP directories)
NAMES = ("hf", "fsdp_dtensor", "torch_dist", "megatron_legacy", "meta")


def get(name: str):
    """The module of format ``name``."""
    if name not in NAMES:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")


def detect(path: str, fmt: str = "auto"):
    """The module of the checkpoint at ``path`` (``fmt`` names it, or ``auto``)."""
    if not os.path.exists(path):
        raise SourceError(f"source {path} does not exist; set source.path to a checkpoint directory")
    if not os.path.isdir(path):
        raise SourceError(f"source {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SourceError(f"source {path} is not readable (permission denied)")
    if fmt != "auto":
        return get(fmt)
    for name in NAMES:
        mod = get(name)
        if mod.detect(path):
            return mod
    raise SourceError(f"cannot tell the format of {path}: expected config.json with model.safetensors "
                      "or model.safetensors.index.json (Hugging Face), or a Megatron checkpoint "
                      "(latest_checkpointed_iteration.txt with release/ or iter_*/ holding mp_rank_* directories "
                      "or a torch_dist .metadata); set source.format to say which")


def writer(name: str, ctx):
    """The :class:`~reshard.formats.target.Target` of format ``name`` for one conversion."""
    return get(name).Target(ctx)
