"""Optimizer state as canonical tensors (FORMATS.md §8): each Adam tensor shadows the weight it
belongs to, under the name ``optimizer.<kind>/<canonical name>``, with that weight's shape and TP
rule, so the planner, the exchange and the verification treat it like a weight (read once, bounded
memory, checksummed).

This version carries the model-space form Megatron-core's distributed optimizer saves with
``--dist-ckpt-optim-fully-reshardable`` (torch_dist ``optimizer.state.<kind>.<model key>``, any
TP/PP/DP), torch_dist to torch_dist. The bucket-space forms (``dp_reshardable`` torch_dist,
legacy ``distrib_optim.pt``) and the non-distributed optimizer's legacy ``optimizer`` entry are
not decoded yet: with them ``optimizer=auto`` converts the weights and names the state it drops,
``optimizer=keep`` refuses.
"""

from __future__ import annotations

from typing import Optional

# the master weight (distributed optimizer: param; Float16Optimizer: fp32_param) and Adam's moments
KINDS = ("param", "fp32_param", "exp_avg", "exp_avg_sq")
DCP_PREFIX = "optimizer.state."
PREFIX = "optimizer."
MODES = ("auto", "keep", "drop")


def shadow(kind: str, canonical: str) -> str:
    return f"{PREFIX}{kind}/{canonical}"


def is_shadow(name: str) -> bool:
    return name.startswith(PREFIX) and "/" in name


def split(name: str):
    """``(kind, canonical)`` of a shadow name."""
    kind, canonical = name[len(PREFIX):].split("/", 1)
    return kind, canonical


def shadows(names) -> list:
    """The shadow names among ``names``."""
    return [n for n in names if is_shadow(n)]


def dcp_model_key(key: str) -> Optional[tuple]:
    """``(kind, model key)`` of a model-space torch_dist optimizer key, else None."""
    if not key.startswith(DCP_PREFIX):
        return None
    kind, _, rest = key[len(DCP_PREFIX):].partition(".")
    return (kind, rest) if kind in KINDS and rest else None
