"""Optimizer state carried with the weights (issue 12, first part): Megatron-core's distributed optimizer
saved ``fully_reshardable`` in torch_dist, resharded to other TP/DP sizes, loaded back by Megatron-core's
own optimizer loading code and compared with Megatron's own resharding of the same save.

The source is made by Megatron-core on CPU (``tests/referees/mcore_train.py make``): a tiny Llama-3 GPT at
TP=2 DP=2 (4 ranks), DistributedDataParallel + DistributedOptimizer (Adam), 2 steps, then saved.
"""

import json
import os

import pytest

from conftest import REPO, read_json, run_jobs, run_reshard, run_torchrun

TRAIN = os.path.join(REPO, "tests", "referees", "mcore_train.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from reshard.synthetic import load_preset

    root = tmp_path_factory.mktemp("opt")
    spec = str(root / "spec.json")
    with open(spec, "w") as f:
        json.dump(dict(load_preset("tiny_llama3").to_dict(), vocab_size=250), f)
    run_torchrun(4, [TRAIN, "make", spec, str(root / "src"), "2"], timeout=600)
    return {"root": root, "spec": spec, "src": str(root / "src"), "td": str(root / "src" / "torch_dist")}


@pytest.fixture(scope="module")
def converted(trained):
    root, src = trained["root"], trained["td"]
    out = {k: str(root / k) for k in ("tp4", "tp1", "drop", "legacy")}
    v = "model.vocab_size=250"
    run_jobs(3, [[v, f"source.path={src}", f"target.path={out['tp4']}", "parallel.target_tp=4"],
                 [v, f"source.path={src}", f"target.path={out['tp1']}", "parallel.target_tp=1"],
                 [v, f"source.path={src}", f"target.path={out['drop']}", "parallel.target_tp=1", "optimizer=drop"],
                 [v, f"source.path={src}", f"target.path={out['legacy']}", "target.format=megatron_legacy",
                  "parallel.target_tp=1"]], root, "opt_jobs")
    checks = {}
    for name, tp in (("tp4", 4), ("tp1", 1)):
        p = run_torchrun(4, [TRAIN, "check", trained["spec"], trained["src"], out[name], str(tp)], timeout=600)
        checks[name] = sorted({x for x in p.stdout.splitlines() if x.startswith(("OK rank", "STEP rank"))})
    return out, checks


@pytest.mark.parametrize("name,tp", [("tp4", 4), ("tp1", 1)])
def test_megatron_loads_every_optimizer_tensor_equal_to_its_own_resharding(converted, name, tp):
    oks = [x for x in converted[1][name] if x.startswith("OK")]
    assert len(oks) == 4, converted[1][name]  # every rank: TP=4 DP=1, or TP=1 DP=4
    assert all("optimizer tensors equal, step 2" in x for x in oks)
    if tp == 4:  # DP=1: each rank holds the whole state of its 27 parameters (master weight + 2 moments)
        assert all(" 81 optimizer tensors equal" in x for x in oks), oks
    steps = [x for x in converted[1][name] if x.startswith("STEP")]
    assert len(steps) == 4  # one more Adam step on the loaded state ran on every rank


def test_training_output_keeps_its_iteration_and_optimizer_groups(converted):
    from reshard.formats import torch_dist

    out = converted[0]["tp4"]
    with open(os.path.join(out, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "2"
    tensors, objects = torch_dist.load_full(os.path.join(out, "iter_0000002"))
    common = objects[torch_dist.COMMON_KEY]
    common = common[0] if isinstance(common, list) else common  # Megatron's byte entry holds [common state]
    assert common["iteration"] == 2 and common["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
    groups = common["optimizer"]["optimizer"]["param_groups"]
    assert len(groups) == 2 and {g["step"] for g in groups} == {2.0} and {g["wd_mult"] for g in groups} == {0.0, 1.0}
    opt = {k for k in tensors if k.startswith("optimizer.state.")}
    model = {k for k in tensors if not k.startswith("optimizer.")}
    assert opt == {f"optimizer.state.{kind}.{k}" for kind in ("param", "exp_avg", "exp_avg_sq") for k in model}
    assert tensors["optimizer.state.exp_avg.embedding.word_embeddings.weight"].shape == (512, 64)  # TP=4 padding
    rep = read_json(os.path.join(out, "reshard_report.json"))
    assert "optimizer state" not in rep["not_carried"] and rep["verify"]["tensors"] == 39 * 4  # weights + 3 kinds


def test_optimizer_drop_and_weights_only_targets_name_what_they_drop(converted):
    from reshard.formats import torch_dist

    drop, legacy = converted[0]["drop"], converted[0]["legacy"]
    with open(os.path.join(drop, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "release"
    tensors, _ = torch_dist.load_full(os.path.join(drop, "release"))
    assert not any(k.startswith("optimizer.") for k in tensors)
    for out in (drop, legacy):
        nc = read_json(os.path.join(out, "reshard_report.json"))["not_carried"]
        assert nc["optimizer state"]["entries"] > 0 and nc["optimizer state"]["bytes"] > 0, nc


def test_optimizer_keep_refuses_a_target_that_cannot_carry_it(trained, tmp_path):
    dst = tmp_path / "hf"
    p = run_reshard(["model.vocab_size=250", f"source.path={trained['td']}", f"target.path={dst}",
                     "target.format=hf", "optimizer=keep"], check=False)
    assert p.returncode != 0 and not dst.exists()
    assert "optimizer=keep: target.format=hf does not carry optimizer state" in p.stdout + p.stderr
