"""Mapping tables, one per architecture family (see README.md in this folder)."""

from ..errors import UnsupportedError
from ..mapping import MappingTable
from ..spec import ModelSpec
from . import llama

FAMILIES = {"llama": llama.TABLE}


def table_for(spec: ModelSpec) -> MappingTable:
    try:
        return FAMILIES[spec.family]
    except KeyError:
        raise UnsupportedError(f"no mapping table for family {spec.family!r}; known: {sorted(FAMILIES)}") from None
