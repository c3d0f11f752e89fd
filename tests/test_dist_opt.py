"""Megatron-core's distributed-optimizer buffer layout (reshard/formats/dist_opt.py), by hand: the rules of
``DistributedOptimizer._compute_per_buffer_param_layout`` (reverse order, 64-element starts, bucket closes,
a shared embedding's own bucket) and the boxes a flat run of a parameter is read in. The referee tests
(test_optimizer.py) check the same layout against buffers Megatron-core wrote."""

import dataclasses
import math
from argparse import Namespace

import pytest
import torch

from reshard.errors import SourceError
from reshard.formats.dist_opt import Param, boxes, bucket_size, layout_buffer, named_parameters_order


def _params():
    # named_parameters() order: the embedding first (shared: tied, first stage of PP > 1), then a, b
    return [Param(None, None, "emb", (10, 10), shared_embedding=True), Param(None, None, "a", (10,)),
            Param(None, None, "b", (7, 10))]


def test_layout_reverses_aligns_and_gives_the_shared_embedding_its_own_bucket():
    buf = layout_buffer(_params())
    # b first (reverse order) at 0..70; a starts at the next multiple of 64; the shared embedding closes the
    # bucket at the aligned start it would have had (192) and has bucket 1 to itself
    assert buf.ranges == {"b": (0, 0, 70), "a": (0, 128, 138), "emb": (1, 0, 100)}
    assert buf.unpadded == [192, 100] and buf.coalesced_start(1) == 192


def test_a_bucket_closes_once_it_holds_bucket_size_elements():
    buf = layout_buffer(_params(), bucket_size=100)
    assert buf.ranges == {"b": (0, 0, 70), "a": (0, 128, 138), "emb": (1, 0, 100)}
    assert buf.unpadded == [138, 100]  # closed at a's end (138 >= 100): no trailing alignment
    one = layout_buffer([Param(None, None, n, (70,)) for n in "xyz"], bucket_size=100)
    assert one.unpadded == [198, 70] and one.ranges["x"] == (1, 0, 70)  # z (0..70), y (128..198) | x


def test_recorded_bucket_sizes_decode_or_refuse():
    assert layout_buffer(_params(), bucket_sizes=[192, 100]).ranges["emb"] == (1, 0, 100)
    with pytest.raises(SourceError, match=r"buckets hold \[190, 100\] elements; the model's parameters .* lay "
                                          r"out as \[192, 100\]"):
        layout_buffer(_params(), bucket_sizes=[190, 100], where="ckpt")


def test_bucket_size_follows_megatron_lm():
    a = Namespace(overlap_grad_reduce=True, ddp_bucket_size=None)
    assert bucket_size(a, 8, 0, 0) == 40000000 and bucket_size(a, 64, 0, 0) == 64000000
    assert bucket_size(a, 8, 1, 0) is None and bucket_size(a, 8, 0, 1) is None  # later stages, later chunks
    assert bucket_size(Namespace(overlap_grad_reduce=True, ddp_bucket_size=1000), 8, 0, 0) == 1000
    assert bucket_size(Namespace(overlap_grad_reduce=False), 8, 0, 0) is None


def test_named_parameters_order_is_module_registration_order():
    names = ["output_layer.weight", "decoder.final_layernorm.weight", "decoder.layers.10.mlp.linear_fc1.weight",
             "decoder.layers.2.self_attention.linear_qkv.weight", "decoder.layers.2.self_attention.linear_proj.weight",
             "decoder.layers.2.input_layernorm.weight", "embedding.word_embeddings.weight",
             "decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight",
             "decoder.layers.2.mlp.experts.local_experts.0.linear_fc2.weight", "decoder.layers.2.mlp.router.weight"]
    assert named_parameters_order(names) == [
        "embedding.word_embeddings.weight", "decoder.layers.2.input_layernorm.weight",
        "decoder.layers.2.self_attention.linear_proj.weight", "decoder.layers.2.self_attention.linear_qkv.weight",
        "decoder.layers.2.mlp.router.weight", "decoder.layers.2.mlp.experts.local_experts.0.linear_fc2.weight",
        "decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight", "decoder.layers.10.mlp.linear_fc1.weight",
        "decoder.final_layernorm.weight", "output_layer.weight"]


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (1, 7)])
def test_boxes_cover_a_flat_run_exactly_with_contiguous_blocks(shape):
    n = math.prod(shape)
    for lo in range(n + 1):
        for hi in range(lo, n + 1):
            seen = torch.zeros(n, dtype=torch.int)
            for origin, size, first in boxes(shape, lo, hi):
                t = torch.zeros(shape, dtype=torch.int)
                t[tuple(slice(o, o + s) for o, s in zip(origin, size))] = 1
                flat = t.reshape(-1).nonzero().flatten()
                assert len(flat) == math.prod(size) and flat[0] == first and flat[-1] == first + len(flat) - 1
                seen[flat] += 1
            want = torch.zeros(n, dtype=torch.int)
            want[lo:hi] = 1
            assert torch.equal(seen, want), (shape, lo, hi)


def test_a_run_exposed_to_megatrons_fully_reshardable_bug_is_named():
    """megatron-core before Megatron-LM 32a03b77 saved fully_reshardable state shifted after a padded bucket end
    (FORMATS.md §8): a run with several buckets per buffer is warned about, a one-bucket run is not."""
    from reshard.formats.dist_opt import fully_reshardable_risk
    from reshard.layout import Layout
    from reshard.models import table_for
    from reshard.synthetic import load_preset

    spec = dataclasses.replace(load_preset("tiny_llama3"), vocab_size=250)
    table, layout = table_for(spec), Layout(tp=2, pp=2)
    args = Namespace(overlap_grad_reduce=True, ddp_bucket_size=5000, data_parallel_size=2, transformer_impl="local")
    risk = fully_reshardable_risk(spec, table, layout, args)
    assert risk and "buckets in a buffer (stage 0)" in risk and "PR #5077" in risk
    assert fully_reshardable_risk(spec, table, layout, Namespace(overlap_grad_reduce=False, data_parallel_size=2)) is None
