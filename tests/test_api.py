"""reshard.api: live state dicts resharded in memory between layouts and namings (FORMATS.md §9).

Real process groups (gloo): 3 ranks, where neither side's layout spans the world, with state dicts cut
by hand from transformers-saved models; and 4 ranks holding real Megatron-core GPTModels' state_dict(),
whose TP=4 result Megatron-core loads strictly and runs to transformers' logits.
"""

import os
import re

import pytest
import torch

from conftest import REPO, run_reshard, run_torchrun, save_transformers_model
from reshard import api
from reshard.errors import LayoutError


@pytest.fixture(scope="module")
def models(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    mixtral = save_transformers_model("tiny_mixtral", str(root / "mixtral"))
    deepseek = save_transformers_model("tiny_deepseek_v3", str(root / "deepseek"))
    out = {"llama3": {"hf": hf_models["llama3"]}, "mixtral": {"hf": mixtral}, "deepseek": {"hf": deepseek}}
    for name, d in list(out.items())[:2]:
        d["td"] = str(root / f"{name}_td")
        run_reshard([f"source.path={d['hf']}", f"target.path={d['td']}", "parallel.target_tp=2",
                     "parallel.target_pp=2", f"paths.root={root}"], nproc=2)
    return out


@pytest.fixture(scope="module")
def three_ranks(models):
    p = run_torchrun(3, [os.path.join(REPO, "tests", "drivers", "api_live.py"), models["llama3"]["hf"],
                         models["mixtral"]["hf"], models["deepseek"]["hf"]], timeout=600)
    return [line for line in p.stdout.splitlines() if line.startswith("OK ")]


@pytest.fixture(scope="module")
def megatron(models):
    args = [x for name in ("llama3", "mixtral") for x in (models[name]["hf"], os.path.join(models[name]["td"], "release"))]
    p = run_torchrun(4, [os.path.join(REPO, "tests", "referees", "mcore_live.py"), *args], timeout=900)
    return [line for line in p.stdout.splitlines() if line.startswith("OK ")]


def _count(lines, pattern):
    return sum(bool(re.search(pattern, line)) for line in lines)


@pytest.mark.parametrize("model", ["tiny_llama3", "tiny_mixtral"])
def test_hf_on_one_rank_to_megatron_on_two_others_receives_exactly_each_shard(three_ranks, model):
    assert _count(three_ranks, rf"OK {model} hf->megatron .* bf16 rank [12]: \d+ tensors equal, received \d+ "
                               "bytes = its shard") == 2


@pytest.mark.parametrize("model", ["tiny_llama3", "tiny_mixtral"])
def test_data_parallel_replicas_share_the_sending_to_fused_vllm_shards(three_ranks, model):
    assert _count(three_ranks, rf"OK {model} megatron tp1 dp2 -> hf_tp fused rank [01]: \d+ tensors equal") == 2
    assert _count(three_ranks, rf"OK {model} replicas share the load rank 2") == 1


@pytest.mark.parametrize("model", ["tiny_llama3", "tiny_mixtral"])
def test_out_tensors_are_filled_in_place(three_ranks, model):
    assert _count(three_ranks, rf"OK {model} megatron tp2 -> tp1 pp2 in place rank [01]: .* same storage") == 2


@pytest.mark.parametrize("model", ["tiny_llama3", "tiny_mixtral"])
def test_iter_full_sends_the_model_once_to_the_one_receiving_rank(three_ranks, model):
    assert _count(three_ranks, rf"OK {model} iter_full rank 0: \d+ tensors in HF order, \d+ rounds, received "
                               "\\d+ bytes = the model once") == 1


def test_virtual_pipeline_chunks_both_ways(three_ranks):
    assert _count(three_ranks, r"OK hf -> megatron pp2 vpp2 chunk [01] rank [12]") == 4
    assert _count(three_ranks, r"OK megatron pp2 vpp2 -> hf rank 0: 39 tensors equal") == 1


def test_deepseek_v3_latent_attention_round_trip_through_megatron(three_ranks):
    assert _count(three_ranks, r"OK tiny_deepseek_v3 hf -> megatron tp2 -> hf_tp tp2 rank [01]") == 2
    assert _count(three_ranks, r"OK tiny_deepseek_v3 hf -> megatron tp2 -> hf rank 2") == 1


def test_a_plan_over_a_subgroup_numbers_ranks_within_it(three_ranks):
    assert _count(three_ranks, r"OK subgroup \[1, 2\]: hf on group rank 0 -> megatron on group rank 1 rank 2") == 1


def test_a_mismatched_state_fails_on_every_rank_naming_the_tensors_before_any_byte_moves(three_ranks):
    lines = [x for x in three_ranks if x.startswith("OK bad state")]
    assert len(lines) == 3
    assert _count(lines, r"^OK bad state rank 1: ConfigError: rank 1: the source state does not match the plan") == 1
    assert _count(lines, r"rank [02]: PeerError: checking the state dicts against the plan failed on rank 1") == 2


@pytest.mark.parametrize("model", ["tiny_llama3", "tiny_mixtral"])
def test_megatron_tp2_pp2_to_tp4_loads_strictly_with_transformers_logits(megatron, model):
    assert _count(megatron, rf"OK {model} megatron tp2 pp2 -> tp4 rank [0-3]: \d+ tensors equal") == 4
    assert _count(megatron, rf"OK {model} tp4 rank [0-3]: GPTModel.load_state_dict\(strict=True\)") == 4
    assert _count(megatron, rf"OK {model} megatron tp2 pp2 -> tp4 in place \(same storage\) rank [0-3]") == 4


def test_megatron_logits_after_the_live_reshard_equal_transformers(megatron):
    # two models x (loaded result, refilled in place) x 4 TP ranks
    assert _count(megatron, r"OK logits rank [0-3] tp [0-3]: .* max \|megatron - transformers\| = ") == 16


@pytest.mark.parametrize("model", ["tiny_llama3", "tiny_mixtral"])
def test_megatron_tp2_pp2_to_tp1_pp4_and_to_vllm_shards(megatron, model):
    assert _count(megatron, rf"OK {model} megatron tp2 pp2 -> tp1 pp4 rank [0-3]") == 4
    assert _count(megatron, rf"OK {model} megatron tp2 pp2 -> hf_tp tp4 rank [0-3]") == 4
    assert _count(megatron, rf"OK {model} megatron tp2 pp2 -> hf_tp tp4 fused rank [0-3]") == 4


@pytest.mark.parametrize("model", ["tiny_llama3", "tiny_mixtral"])
def test_trainer_and_engine_on_disjoint_ranks(megatron, model):
    assert _count(megatron, rf"OK {model} megatron tp2 on ranks 0,1 -> hf_tp tp2 on ranks 2,3 \(received \d+ "
                            r"bytes = its shard\) rank [23]") == 2


# ------------------------------------------------------------------------------ plans, no processes

def test_plan_is_pure_and_the_same_twice():
    a = api.plan("tiny_mixtral", api.Layout(tp=2, pp=2), api.Layout(tp=4, naming="hf_tp", fused=True))
    b = api.plan("tiny_mixtral", api.Layout(tp=2, pp=2), api.Layout(tp=4, naming="hf_tp", fused=True))
    key = lambda p: [(x.key, x.reader, x.writers, x.round, x.s_off, x.dst_off) for x in p.schedule(1 << 20).pieces]  # noqa: E731
    assert key(a) == key(b) and a.schedule(1 << 20) is a.schedule(1 << 20)


def test_bytes_received_per_rank_are_its_shard_not_the_model():
    spec = api.model_spec("llama3_8b")
    pl = api.plan(spec, api.Layout(tp=2, pp=2), api.Layout(tp=4))
    stats = pl.rank_bytes()
    shard = [sum(2 * torch.Size(s.shape).numel() for s in pl.dst_slots[r]) for r in range(4)]
    model = 2 * 8_030_261_248
    for r in range(4):
        assert stats[r]["recv"] + stats[r]["local"] <= shard[r] < model / 3
        assert stats[r]["recv"] + stats[r]["local"] >= shard[r] - 2 * 4096 * 1024  # vocab padding rows made locally


@pytest.mark.parametrize("lay,msg", [
    (api.Layout(tp=3), "num_attention_heads=4 is not divisible by tp=3"),
    (api.Layout(tp=8, naming="hf_tp"), "num_attention_heads=4 is not divisible by tp=8"),
    (api.Layout(tp=2, naming="hf"), "naming=hf holds full tensors"),
    (api.Layout(tp=2, pp=2, naming="hf_tp"), "pp, vpp, ep and etp must be 1"),
    (api.Layout(tp=2, ranks=(0, 0)), "must be 2 distinct ranks"),
    (api.Layout(naming="vllm"), "is not one of"),
])
def test_layouts_that_do_not_fit_are_refused_with_the_reason(lay, msg):
    with pytest.raises(LayoutError, match=re.escape(msg)):
        api.plan("tiny_llama3", api.Layout(), lay)


def test_ep_must_fit_inside_the_data_parallel_ranks():
    with pytest.raises(LayoutError, match=r"tp\*dp=2 ranks per stage do not hold etp\*ep=4"):
        api.plan("tiny_mixtral", api.Layout(tp=2, ep=2), api.Layout())


def test_vllm_vocab_padding_and_kv_head_replication():
    spec = api.model_spec("tiny_llama3")  # vocab 250 -> 256 rows, 64 a rank; 2 kv heads over 4 ranks
    pl = api.plan(spec, api.Layout(naming="hf"), api.Layout(tp=4, naming="hf_tp"))
    last = {s.name: s for s in pl.dst_slots[3]}
    emb = last["model.embed_tokens.weight"]
    assert emb.shape == (64, 64) and emb.pad_from == 58 and emb.placements[0].c_off == (192, 0)
    k2, k3 = ({s.name: s for s in pl.dst_slots[r]}["model.layers.0.self_attn.k_proj.weight"] for r in (2, 3))
    assert k2.placements == k3.placements and k2.placements[0].c_off == (16, 0) and k2.shape == (16, 64)


def test_the_readme_example_runs_on_4_ranks():
    p = run_torchrun(4, [os.path.join(REPO, "examples", "live_reshard.py")], timeout=300)
    found = re.findall(r"rank (\d): 27 engine tensors equal to the HF weights; received (\d+) bytes, (\d+) copied "
                       r"locally \(its shard: (\d+) bytes\)", p.stdout)
    assert sorted(int(r) for r, *_ in found) == [0, 1, 2, 3], p.stdout
    for _, got, local, shard in found:  # received + already held = its shard, less the zero padding rows
        assert int(shard) - 2 * 6 * 64 * 2 <= int(got) + int(local) <= int(shard)


def test_model_spec_from_a_preset_an_hf_config_and_megatron_args():
    from reshard.formats.megatron_args import make_args
    from reshard.layout import Layout as ParallelLayout
    from reshard.spec import to_hf_config

    spec = api.model_spec("tiny_mixtral")
    assert api.model_spec(to_hf_config(spec)).num_experts == 8
    args = make_args(spec, ParallelLayout(tp=2), torch.bfloat16, "torch_dist", "transformer_engine", None)
    got = api.model_spec(args)
    assert (got.num_layers, got.num_query_groups, got.num_experts, got.ffn_hidden_size) == (4, 2, 8, 96)
