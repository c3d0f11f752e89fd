"""The fused/padded layouts as pure functions: split -> merge round trips, and the row
segments the planner uses agree with the whole-tensor functions."""

import pytest
import torch

from reshard.transforms import (apply_segments, gated_segments, gated_tp_merge, gated_tp_shard, merge_gated,
                                merge_qkv, pad_vocab, qkv_segments, rope_hf_to_meta, rope_meta_to_hf,
                                split_gated, split_qkv, unpad_vocab, vocab_segments)


def _labelled(rows, cols=3, base=0):
    """Rows whose values say where they came from (base + row index)."""
    return (torch.arange(rows, dtype=torch.float64) + base)[:, None].repeat(1, cols)


@pytest.mark.parametrize("nh,ng,hd", [(4, 4, 2), (8, 2, 4), (8, 1, 2), (6, 3, 2)])
def test_qkv_merge_then_split_gives_back_q_k_v(nh, ng, hd):
    q, k, v = _labelled(nh * hd), _labelled(ng * hd, base=1000), _labelled(ng * hd, base=2000)
    fused = merge_qkv(q, k, v, ng)
    assert fused.shape == ((nh + 2 * ng) * hd, 3)
    q2, k2, v2 = split_qkv(fused, nh, ng, hd)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


def test_qkv_fused_rows_are_grouped_by_kv_head():
    nh, ng, hd = 4, 2, 1
    q, k, v = _labelled(nh * hd), _labelled(ng * hd, base=100), _labelled(ng * hd, base=200)
    fused = merge_qkv(q, k, v, ng)[:, 0].tolist()
    # group 0: q heads 0,1 then k0, v0; group 1: q heads 2,3 then k1, v1
    assert fused == [0, 1, 100, 200, 2, 3, 101, 201]


@pytest.mark.parametrize("nh,ng,hd", [(4, 2, 2), (8, 8, 1), (8, 1, 3)])
def test_qkv_segments_build_the_same_tensor_as_merge(nh, ng, hd):
    q, k, v = _labelled(nh * hd), _labelled(ng * hd, base=500), _labelled(ng * hd, base=900)
    segs = qkv_segments(nh, ng, hd)
    built = apply_segments({"q": q, "k": k, "v": v}, segs, (nh + 2 * ng) * hd)
    assert torch.equal(built, merge_qkv(q, k, v, ng))


def test_qkv_bias_round_trip_on_one_dimensional_tensors():
    q, k, v = torch.arange(8.0), torch.arange(4.0) + 10, torch.arange(4.0) + 20
    fused = merge_qkv(q, k, v, 2)
    assert fused.shape == (16,)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 4, 2, 2), (q, k, v)))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_tp_chunks_concatenate_to_the_tp1_layout_even_with_fewer_kv_heads_than_ranks(tp):
    nh, ng, hd = 4, 1, 2
    fused = merge_qkv(_labelled(nh * hd), _labelled(ng * hd, base=50), _labelled(ng * hd, base=90), ng)
    chunks = fused.chunk(tp, dim=0)
    assert len({c.shape for c in chunks}) == 1
    assert torch.equal(torch.cat(chunks), fused)


def test_gated_merge_split_round_trip_and_segments():
    gate, up = _labelled(6), _labelled(6, base=100)
    fc1 = merge_gated(gate, up)
    g2, u2 = split_gated(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    assert torch.equal(apply_segments({"gate": gate, "up": up}, gated_segments(6), 12), fc1)


@pytest.mark.parametrize("tp", [1, 2, 3, 6])
def test_gated_tp_shards_hold_gate_and_up_slices_and_merge_back(tp):
    gate, up = _labelled(6), _labelled(6, base=100)
    fc1 = merge_gated(gate, up)
    shards = [gated_tp_shard(fc1, tp, r) for r in range(tp)]
    f = 6 // tp
    for r, s in enumerate(shards):
        assert torch.equal(s, torch.cat([gate[r * f:(r + 1) * f], up[r * f:(r + 1) * f]]))
    assert torch.equal(gated_tp_merge(shards), fc1)
    if tp > 1:  # plain concatenation of the shards is the classic corruption
        assert not torch.equal(torch.cat(shards), fc1)


@pytest.mark.parametrize("vocab,padded", [(250, 256), (256, 256), (1, 128), (300, 512)])
def test_vocab_padding_repeats_the_last_row_and_unpads_exactly(vocab, padded):
    emb = _labelled(vocab)
    p = pad_vocab(emb, padded)
    assert p.shape[0] == padded
    assert torch.equal(p[vocab:], emb[-1:].expand(padded - vocab, 3))
    assert torch.equal(unpad_vocab(p, vocab), emb)
    assert torch.equal(apply_segments({"": emb}, vocab_segments(vocab, padded), padded), p)


@pytest.mark.parametrize("heads,hd", [(4, 8), (2, 2), (3, 16)])
def test_rope_permutation_matches_the_documented_formula_and_inverts(heads, hd):
    meta = _labelled(heads * hd)
    hf = rope_meta_to_hf(meta, heads)
    for g in range(heads):
        for p in (0, 1):
            for i in range(hd // 2):
                assert torch.equal(hf[g * hd + p * hd // 2 + i], meta[g * hd + 2 * i + p])
    assert torch.equal(rope_hf_to_meta(hf, heads), meta)
    assert torch.equal(hf, meta) == (hd == 2)  # a 2-dim head has one pair: nothing moves
