"""Reading torch.save files without running their pickles, and the TP placement rules."""

import argparse
import enum
import os

import pytest
import torch

from reshard.errors import SourceError
from reshard.formats import megatron as mg
from reshard.formats import torchzip
from reshard.formats.base import RawReader, StoredTensor
from reshard.layout import Layout
from reshard.models import llama
from reshard.synthetic import load_preset
from reshard.transforms import apply_segments, gated_tp_shard, merge_gated


class Fused(enum.Enum):  # stands in for Megatron's enums in args
    on = 1


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_hostile_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "f.pt")
    torch.save({"args": argparse.Namespace(x=Hostile(str(marker))), "w": torch.ones(2)}, path)
    obj = torchzip.parse_file(path)
    assert not marker.exists()
    placeholder = obj["args"].x
    assert isinstance(placeholder, torchzip.Opaque) and placeholder.name == "system"
    with pytest.raises(Exception):  # plain weights_only=True refuses the file outright
        torch.load(path, weights_only=True)


def test_tensor_refs_point_at_the_right_bytes(tmp_path):
    base = torch.arange(60, dtype=torch.bfloat16).reshape(6, 10)
    state = {"args": argparse.Namespace(kind=Fused.on, dtype=torch.bfloat16), "view": base[2:4],
             "f32": torch.randn(3, 5), "none": None}
    path = str(tmp_path / "f.pt")
    torch.save(state, path)
    obj = torchzip.parse_file(path)
    assert obj["args"].dtype is torch.bfloat16 and obj["args"].kind.value == 1
    reader = RawReader(str(tmp_path))
    for key in ("view", "f32"):
        ref = obj[key]
        st = StoredTensor("f.pt", key, ref.shape, ref.dtype, ref.offset)
        assert torch.equal(reader.read(st, (0, 0), ref.shape), state[key])
        assert torch.equal(reader.read(st, (1, 1), (1, 3)), state[key][1:2, 1:4])  # a strided block
    reader.close()


def test_a_truncated_file_is_a_source_error(tmp_path):
    path = str(tmp_path / "f.pt")
    torch.save({"w": torch.randn(100, 100)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5000)
    with pytest.raises(SourceError, match="f.pt"):
        torchzip.parse_file(path)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_local_placements_rebuild_each_rank_shard(tp):
    """Filling a rank's local tensor from its placements gives Megatron's TP shard of the fused tensor."""
    spec = load_preset("tiny_llama3")
    layout = Layout(tp=tp)
    torch.manual_seed(0)
    canon = {n: torch.randn(e.part_shape(spec, role)) for n, (e, role, _) in llama.TABLE.canonical_names(spec).items()}
    for entry, layer in llama.TABLE.entries(spec):
        full = apply_segments({r: canon[n.format(i=layer)] for r, n in entry.parts().items()},
                              entry.segments(spec, layout), entry.rows(spec, layout))
        for t in range(tp):
            local = torch.full(mg.local_shape(entry, spec, layout), float("nan"))
            for pl in mg.local_placements(entry, spec, layout, t, layer):
                src = canon[pl.canonical][tuple(slice(o, o + s) for o, s in zip(pl.c_off, pl.c_size))]
                rows = pl.c_size[0] * pl.repeat
                local[tuple(slice(o, o + s) for o, s in zip(pl.dst_off, (rows,) + pl.c_size[1:]))] = src
            if entry.tp_rule == "gated":
                exp = gated_tp_shard(merge_gated(*(canon[n.format(i=layer)] for n in entry.parts().values())), tp, t)
            elif entry.tp_rule == "row":
                exp = full.chunk(tp, dim=1)[t]
            elif entry.tp_rule == "replicated":
                exp = full
            else:
                exp = full.chunk(tp, dim=0)[t]
            assert torch.equal(local, exp), (entry.mcore, layer, t)
