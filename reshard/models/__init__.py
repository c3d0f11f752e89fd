"""Mapping tables, one per architecture family (see README.md in this folder)."""

from ..errors import UnsupportedError
from ..mapping import MappingTable
from ..spec import ModelSpec
from . import bert, deepseek, llama, moe

FAMILIES = {"llama": llama.TABLE, "mixtral": moe.MIXTRAL, "qwen2_moe": moe.QWEN2_MOE,
            "deepseek_v3": deepseek.DEEPSEEK_V3, "bert": bert.TABLE}
_EXPANDED = {}


def table_for(spec: ModelSpec) -> MappingTable:
    """The family's table, expert entries expanded for the spec's expert count."""
    try:
        table = FAMILIES[spec.family]
    except KeyError:
        raise UnsupportedError(f"no mapping table for family {spec.family!r}; known: {sorted(FAMILIES)}") from None
    key = (spec.family, spec.num_experts)
    if key not in _EXPANDED:
        _EXPANDED[key] = table.for_spec(spec)
    return _EXPANDED[key]
