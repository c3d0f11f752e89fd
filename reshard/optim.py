"""Optimizer state as canonical tensors (FORMATS.md §8): each Adam tensor shadows the weight it
belongs to, under the name ``optimizer.<kind>/<canonical name>``, with that weight's shape and TP
rule, so the planner, the exchange and the verification treat it like a weight (read once, bounded
memory, checksummed).

Read: Megatron-core's distributed optimizer as torch_dist ``fully_reshardable`` (``optimizer.state.<kind>.<model
key>``) and ``dp_reshardable`` (bucket space), legacy ``distrib_optim.pt`` (reshard/formats/dist_opt.py decodes the
bucket forms); the non-distributed optimizer (FP32Optimizer / Float16Optimizer) as its legacy ``optimizer`` entry
(torch Adam's state per parameter id) and torch_dist (``optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<key>``).
Written: torch_dist in the form the source's optimizer loads, legacy ``distrib_optim.pt`` + ``optimizer`` entry,
or the non-distributed ``optimizer`` entry.
"""

from __future__ import annotations

from typing import Optional

# the master weight (distributed optimizer: param; Float16Optimizer: fp32_param) and Adam's moments
KINDS = ("param", "fp32_param", "exp_avg", "exp_avg_sq")
DCP_PREFIX = "optimizer.state."
PREFIX = "optimizer."
MODES = ("auto", "keep", "drop")
# the sharding of the non-distributed optimizer's state (FP32Optimizer / Float16OptimizerWithFloat16Params): model
# space, per-parameter torch Adam state (legacy 'optimizer' entry; torch_dist optimizer.state.<kind>.<key>)
NON_DISTRIBUTED = "non-distributed optimizer"


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
