"""Megatron-core itself is the referee: a real GPTModel (local spec, CPU, gloo) loads what
reshard wrote with ``dist_checkpointing.load`` at the default strictness, at several
layouts, and every parameter on every rank equals the HF source mapped by hand."""

import os

import pytest

from conftest import REPO, run_reshard, run_torchrun

CHECK = os.path.join(REPO, "tests", "referees", "check_mcore_load.py")


def _mcore_load(ckpt, hf_dir, tp, pp):
    p = run_torchrun(tp * pp, [CHECK, ckpt, hf_dir, str(tp), str(pp)], timeout=600)
    oks = [line for line in p.stdout.splitlines() if line.startswith("OK rank")]
    assert len(oks) == tp * pp, p.stdout
    return oks


@pytest.fixture(scope="module")
def llama3_tp2_pp2_on_3_ranks(hf_models, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("acc") / "llama3_tp2_pp2")
    run_reshard([f"source.path={hf_models['llama3']}", f"target.path={out}", "parallel.target_tp=2",
                 "parallel.target_pp=2", f"paths.root={os.path.dirname(out)}"], nproc=3)
    return out


@pytest.fixture(scope="module")
def loaded_at_two_layouts(llama3_tp2_pp2_on_3_ranks, hf_models):
    """One torchrun of 4 ranks loads the output at TP=2 PP=2, then at TP=1 PP=1 (4 data-parallel replicas)."""
    p = run_torchrun(4, [CHECK, os.path.join(llama3_tp2_pp2_on_3_ranks, "release"), hf_models["llama3"],
                         "2,2,1", "1,1,1"], timeout=600)
    oks = [line for line in p.stdout.splitlines() if line.startswith("OK rank")]
    assert len(oks) == 8, p.stdout
    return oks[:4], oks[4:]


def test_megatron_loads_3_rank_tp2_pp2_output_at_tp2_pp2_every_tensor_equal(loaded_at_two_layouts):
    oks = loaded_at_two_layouts[0]
    assert sorted(o.split(":")[0].split(" tp ")[1] for o in oks) == ["0 pp 0 ep 0", "0 pp 1 ep 0", "1 pp 0 ep 0",
                                                                      "1 pp 1 ep 0"]


def test_megatron_loads_the_same_output_at_tp1_pp1_every_tensor_equal(loaded_at_two_layouts):
    oks = loaded_at_two_layouts[1]
    assert all("27 tensors equal" in ok for ok in oks)  # 4 layers x 6 + embedding, final norm, output layer


@pytest.mark.parametrize("family,tp,pp,load_tp,load_pp", [
    ("qwen2", 2, 1, 2, 2),  # qkv bias; tied embeddings with the output copy on the last stage
    ("mistral", 2, 2, 2, 1),  # one kv head on two TP ranks
])
def test_megatron_loads_other_families_at_another_layout(hf_models, tmp_path, family, tp, pp, load_tp, load_pp):
    out = str(tmp_path / family)
    run_reshard([f"source.path={hf_models[family]}", f"target.path={out}", f"parallel.target_tp={tp}",
                 f"parallel.target_pp={pp}", f"paths.root={tmp_path}"], nproc=2)
    _mcore_load(os.path.join(out, "release"), hf_models[family], load_tp, load_pp)
