"""Optimizer state carried with the weights (issue 12): Megatron-core's distributed optimizer, saved by
Megatron-core itself as torch_dist ``fully_reshardable``, torch_dist ``dp_reshardable`` and legacy
``distrib_optim.pt``, resharded to other TP/DP sizes into torch_dist, loaded back by Megatron-core's own
loading code and compared with Megatron's own resharding of the same save; then one more training step.

The source is made by Megatron-core on CPU (``tests/referees/mcore_train.py make``): a tiny Llama-3 GPT at
TP=2 PP=2 DP=2 (8 ranks, Megatron's 1F1B schedule between the stages), DistributedDataParallel + DistributedOptimizer (Adam) + OptimizerParamScheduler,
2 steps, then saved; a third step's loss and weights are the reference for the step after a conversion.
"""

import json
import os
import re
import shutil

import pytest

from conftest import REPO, read_json, run_jobs, run_reshard, run_torchrun

TRAIN = os.path.join(REPO, "tests", "referees", "mcore_train.py")
V = "model.vocab_size=250"

# name -> (source form, target format, target TP, --make-vocab-size-divisible-by of the target, target PP): 64 at
# TP=4 keeps the source's padded vocab (256), so that the step after loading can equal the source's own third step
JOBS = {"tp4": ("torch_dist", "torch_dist", 4, 128, 1), "tp1": ("torch_dist", "torch_dist", 1, 128, 1),
        "dp_tp4": ("torch_dist_dp", "torch_dist", 4, 64, 1), "dp_pp4": ("torch_dist_dp", "torch_dist", 1, 128, 4),
        "dp_tp1": ("torch_dist_dp", "torch_dist", 1, 128, 1), "leg_tp4": ("legacy", "torch_dist", 4, 64, 1),
        # into legacy files: model_optim_rng.pt (optimizer entry, scheduler) + distrib_optim.pt per TP x PP rank
        "dp_leg4": ("torch_dist_dp", "megatron_legacy", 4, 64, 1),
        "leg_leg_pp4": ("legacy", "megatron_legacy", 1, 128, 4)}
SAME_VOCAB = [k for k, (_, _, tp, m, _) in JOBS.items() if m * tp == 256 or tp == 1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from reshard.synthetic import load_preset

    root = tmp_path_factory.mktemp("opt")
    spec = str(root / "spec.json")
    with open(spec, "w") as f:
        json.dump(dict(load_preset("tiny_llama3").to_dict(), vocab_size=250), f)
    run_torchrun(8, [TRAIN, "make", spec, str(root / "src"), "2", "2"], timeout=900)
    src = str(root / "src")
    return {"root": root, "spec": spec, "src": src, **{k: os.path.join(src, k) for k in
                                                       ("torch_dist", "torch_dist_dp", "legacy")}}


@pytest.fixture(scope="module")
def converted(trained):
    root = trained["root"]
    out = {k: str(root / k) for k in list(JOBS) + ["drop", "hf_target"]}
    jobs = [[V, f"source.path={trained[form]}", f"target.path={out[name]}", f"target.format={fmt}",
             "target.transformer_impl=local", f"parallel.target_tp={tp}", f"parallel.target_pp={pp}",
             f"parallel.make_vocab_size_divisible_by={m}"] for name, (form, fmt, tp, m, pp) in JOBS.items()]
    jobs += [[V, f"source.path={trained['torch_dist']}", f"target.path={out['drop']}", "parallel.target_tp=1",
              "optimizer=drop"],
             [V, f"source.path={trained['torch_dist']}", f"target.path={out['hf_target']}", "target.format=hf"]]
    run_jobs(3, jobs, root, "opt_jobs")  # 3 ranks: neither the source's 4 nor the targets' 1 or 4
    p = run_torchrun(4, [TRAIN, "check", trained["spec"], trained["src"]]
                     + [f"{out[name]}:{tp}:{m}:{pp}" for name, (_, _, tp, m, pp) in JOBS.items()], timeout=900)
    lines = {name: sorted({x for x in p.stdout.splitlines() if re.match(rf"\w+ job {k} ", x)})
             for k, name in enumerate(JOBS)}
    return out, lines


def _of(lines, what):
    return [x for x in lines if x.startswith(what + " job")]


@pytest.mark.parametrize("name", list(JOBS))
def test_megatron_loads_every_optimizer_tensor_equal_to_its_own_resharding(converted, name):
    lines = converted[1][name]
    oks = _of(lines, "OK")
    assert len(oks) == 4, lines  # every rank: TP=4, PP=4 or DP=4
    assert all("optimizer tensors equal, step 2" in x for x in oks)
    counts = [int(re.search(r": (\d+) optimizer", x).group(1)) for x in oks]
    tp, pp = JOBS[name][2], JOBS[name][4]
    if tp == 4:  # DP=1: each rank holds the whole state of its 27 parameters (master weight + 2 moments)
        assert counts == [81] * 4, oks
    elif pp == 4:  # DP=1: the stages' 7 + 6 + 6 + 8 parameters, 3 tensors each
        assert counts == [21, 18, 18, 24], oks
    else:  # DP=4: the 27 parameters' state split over 4 ranks, each holds a part of it
        assert sum(counts) >= 81, oks
    # Megatron's own scheduler loads the carried scheduler state; the iteration and the samples seen are kept
    states = _of(lines, "STATE")
    form = "legacy" if JOBS[name][1] == "megatron_legacy" else "torch_dist"  # how Megatron loaded it
    assert len(states) == 4 and all(f"{form}, iteration 2, scheduler num_steps 8, consumed_train_samples 8" in x
                                    for x in states), states


@pytest.mark.parametrize("name", SAME_VOCAB)
def test_the_next_step_is_the_step_the_source_took(converted, name):
    """Same padded vocab as the source: the loss of the step after loading and the updated weights equal
    Megatron's own resharding's, and the source's own third step's up to the order of float sums."""
    lines = converted[1][name]
    steps = _of(lines, "STEP")
    assert len(steps) == 4, lines
    for x in steps:
        ours, megatron, source = re.search(r"loss ([\d.]+) \(Megatron's own resharding ([\d.]+); the source at "
                                           r"tp 2 pp 2 dp 2: ([\d.]+)\)", x).groups()
        # ours is Megatron's own resharding's to the bit; the source's up to the order of float sums (other TP/DP)
        assert ours == megatron and abs(float(ours) - float(source)) < 1e-5, x
    for x in _of(lines, "WEIGHTS"):
        m = re.search(r"(\d+) of (\d+) updated weights equal .* max \|d\| vs the source's step 3 ([\d.e+-]+)", x)
        assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 6 and float(m.group(3)) < 1e-5, x
    assert sum(int(re.search(r"(\d+) of", x).group(1)) for x in _of(lines, "WEIGHTS")) >= 27


def test_training_output_keeps_its_iteration_scheduler_and_args(converted, trained):
    from argparse import Namespace

    from reshard.formats import torch_dist

    out = converted[0]["dp_tp4"]
    with open(os.path.join(out, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "2"
    tensors, objects = torch_dist.load_full(os.path.join(out, "iter_0000002"))
    common = objects[torch_dist.COMMON_KEY]
    common = common[0] if isinstance(common, list) else common  # Megatron's byte entry holds [common state]
    assert common["iteration"] == 2 and common["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
    assert common["optimizer"]["param_state_sharding_type"] == "fully_reshardable"
    groups = common["optimizer"]["optimizer"]["param_groups"]
    assert len(groups) == 2 and {g["step"] for g in groups} == {2.0} and {g["wd_mult"] for g in groups} == {0.0, 1.0}
    assert common["opt_param_scheduler"]["num_steps"] == 8
    args = common["args"]
    assert isinstance(args, Namespace) and args.consumed_train_samples == 8 and args.global_batch_size == 4
    assert args.tensor_model_parallel_size == 4 and args.data_parallel_size is None  # the resuming job's to set
    assert args.vocab_size == 250 and args.padded_vocab_size == 256  # padding rows carried, the vocab still 250
    opt = {k for k in tensors if k.startswith("optimizer.state.")}
    model = {k for k in tensors if not k.startswith("optimizer.")}
    assert opt == {f"optimizer.state.{kind}.{k}" for kind in ("param", "exp_avg", "exp_avg_sq") for k in model}
    src, _ = torch_dist.load_full(os.path.join(trained["torch_dist"], "iter_0000002"))
    for k in ("embedding.word_embeddings.weight", "optimizer.state.exp_avg.output_layer.weight"):
        assert tensors[k].shape == (256, 64) and (tensors[k] == src[k]).all()  # padding rows 250..255 included
    rep = read_json(os.path.join(out, "reshard_report.json"))
    assert "optimizer state" not in rep["not_carried"] and rep["verify"]["tensors"] == 39 * 4  # weights + 3 kinds
    assert set(rep["not_carried"]) <= {"RNG state"}, rep["not_carried"]


def test_legacy_output_has_megatrons_files(converted):
    """What Megatron-LM's legacy save writes: each rank file with the optimizer entry and the scheduler, and
    beside it the distributed optimizer's coalesced buffers sized as Megatron lays out the target's buckets."""
    import torch

    out = os.path.join(converted[0]["dp_leg4"], "iter_0000002")
    assert sorted(os.listdir(out)) == [f"mp_rank_{t:02d}" for t in range(4)]
    for t in range(4):
        d = os.path.join(out, f"mp_rank_{t:02d}")
        assert sorted(os.listdir(d)) == ["distrib_optim.pt", "model_optim_rng.pt"]
        state = torch.load(os.path.join(d, "model_optim_rng.pt"), weights_only=False)
        assert {g["step"] for g in state["optimizer"]["optimizer"]["param_groups"]} == {2.0}
        assert state["opt_param_scheduler"]["num_steps"] == 8 and state["args"].use_distributed_optimizer
        opt = torch.load(os.path.join(d, "distrib_optim.pt"), weights_only=False)
        buf = opt[0][(torch.float32, torch.float32)]
        local = sum(x.numel() for x in state["model"].values() if isinstance(x, torch.Tensor))
        assert opt["buckets_coalesced"] and buf["param"].shape == (buf["numel_unpadded"],)
        assert local <= buf["numel_unpadded"] < local + 64 * len(state["model"])  # 64-element aligned starts


def test_optimizer_drop_and_weights_only_targets_name_what_they_drop(converted):
    from reshard.formats import torch_dist

    drop, hf = converted[0]["drop"], converted[0]["hf_target"]
    with open(os.path.join(drop, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "release"
    tensors, _ = torch_dist.load_full(os.path.join(drop, "release"))
    assert not any(k.startswith("optimizer.") for k in tensors)
    assert tensors["embedding.word_embeddings.weight"].shape == (256, 64)  # weights only: no padding rows carried
    for out in (drop, hf):
        nc = read_json(os.path.join(out, "reshard_report.json"))["not_carried"]
        assert nc["optimizer state"]["entries"] > 0 and nc["optimizer state"]["bytes"] > 0, nc


def test_optimizer_keep_refuses_a_target_that_cannot_carry_it(trained, tmp_path):
    dst = tmp_path / "hf"
    p = run_reshard([V, f"source.path={trained['torch_dist_dp']}", f"target.path={dst}", "target.format=hf",
                     "optimizer=keep"], check=False)
    assert p.returncode != 0 and not dst.exists()
    assert "optimizer=keep: target.format=hf does not carry optimizer state" in p.stdout + p.stderr


def test_inspect_names_the_optimizer_state_and_its_bytes(trained):
    import subprocess
    import sys

    for form, what in (("torch_dist_dp", "dp_reshardable"), ("legacy", "distrib_optim.pt"),
                       ("torch_dist", "fully_reshardable")):
        r = subprocess.run([sys.executable, "-m", "reshard.inspect", "--vocab-size", "250", trained[form]],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
        assert r.returncode == 0, r.stdout + r.stderr
        line = next(x for x in r.stdout.splitlines() if x.startswith("optimizer state:"))
        assert line.startswith(f"optimizer state: {what}, exp_avg, exp_avg_sq, param: 117 tensor(s)") and \
            "0.002 GB, 2 param group(s), step 2.0, scheduler state yes; carried to torch_dist" in line, line
        assert "distrib_optim/0/" in r.stdout if form == "legacy" else "optimizer." in r.stdout


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_a_missing_distrib_optim_fails_clearly_and_drop_converts(trained, tmp_path):
    src = _copy(trained["legacy"], tmp_path / "legacy")
    os.remove(os.path.join(src, "iter_0000002", "mp_rank_01_001", "distrib_optim.pt"))
    dst = tmp_path / "out"
    p = run_reshard([V, f"source.path={src}", f"target.path={dst}", "target.format=torch_dist"], check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and not dst.exists(), text
    assert "optimizer state" in text and "is incomplete" in text and "1 distrib_optim.pt file(s) missing" in text
    assert "mp_rank_01_001/distrib_optim.pt" in text
    run_reshard([V, f"source.path={src}", f"target.path={dst}", "target.format=torch_dist", "optimizer=drop"])
    nc = read_json(os.path.join(dst, "reshard_report.json"))["not_carried"]
    assert nc["optimizer state"]["entries"] == 4 and nc["distributed optimizer state"]["entries"] == 3, nc


def test_a_truncated_bucket_fails_clearly_and_drop_converts(trained, tmp_path):
    """A dp_reshardable file cut short inside an optimizer bucket's bytes (its model tensors intact)."""
    from reshard.formats import torch_dist as td

    src = _copy(trained["torch_dist_dp"], tmp_path / "dp")
    ckpt = os.path.join(src, "iter_0000002")
    md, storage = td.read_metadata(ckpt)
    last = {}  # file -> (end, key) of its last record
    for (key, _), info in storage.items():
        end = info.offset + info.length
        if end > last.get(info.relative_path, (0, ""))[0]:
            last[info.relative_path] = (end, key)
    file, (end, key) = next((f, v) for f, v in sorted(last.items()) if ".bucket_idx_" in v[1])
    model_end = max(i.offset + i.length for (k, _), i in storage.items()
                    if i.relative_path == file and not k.startswith("optimizer."))
    assert model_end < end - 64
    os.truncate(os.path.join(ckpt, file), end - 64)
    dst = tmp_path / "out"
    p = run_reshard([V, f"source.path={src}", f"target.path={dst}"], check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and not dst.exists(), text
    assert "is incomplete" in text and f"{file} is truncated" in text, text
    run_reshard([V, f"source.path={src}", f"target.path={dst}", "optimizer=drop"])
    assert "optimizer state" in read_json(os.path.join(dst, "reshard_report.json"))["not_carried"]


# ------------------------------------------------------------------ the non-distributed optimizer

ND_JOBS = {"nd_leg_pp4": ("legacy", "megatron_legacy", 1, 128, 4), "nd_td_tp4": ("legacy", "torch_dist", 4, 64, 1),
           "nd_td_leg4": ("torch_dist", "megatron_legacy", 4, 64, 1)}


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def non_distributed(tmp_path_factory, request):
    """Megatron-core's non-distributed optimizer (--use-distributed-optimizer off) trained at TP=2 PP=2 DP=2 -
    FP32Optimizer in fp32, Float16OptimizerWithFloat16Params (fp32 masters beside bf16 weights) in bf16 - saved
    as legacy (torch Adam's state of each rank's shards in the 'optimizer' entry) and torch_dist; converted to
    TP=1 PP=4 and TP=4, both formats; loaded back and stepped by Megatron."""
    from reshard.synthetic import load_preset

    root = tmp_path_factory.mktemp(f"opt_nd_{request.param}")
    spec = str(root / "spec.json")
    with open(spec, "w") as f:
        json.dump(dict(load_preset("tiny_llama3").to_dict(), vocab_size=250), f)
    src = str(root / "src")
    run_torchrun(8, [TRAIN, "make_nd" if request.param == "fp32" else "make_nd16", spec, src, "2", "2"], timeout=900)
    out = {k: str(root / k) for k in ND_JOBS}
    run_jobs(3, [[V, f"source.path={os.path.join(src, form)}", f"target.path={out[name]}", f"target.format={fmt}",
                  "target.transformer_impl=local", f"parallel.target_tp={tp}", f"parallel.target_pp={pp}",
                  f"parallel.make_vocab_size_divisible_by={m}"] for name, (form, fmt, tp, m, pp) in ND_JOBS.items()],
             root, "nd_jobs")
    p = run_torchrun(4, [TRAIN, "check", spec, src]
                     + [f"{out[name]}:{tp}:{m}:{pp}" for name, (_, _, tp, m, pp) in ND_JOBS.items()], timeout=900)
    lines = {name: sorted({x for x in p.stdout.splitlines() if re.match(rf"\w+ job {k} ", x)})
             for k, name in enumerate(ND_JOBS)}
    return {"src": src, "out": out, "lines": lines, "dtype": request.param}


@pytest.mark.parametrize("name", list(ND_JOBS))
def test_the_non_distributed_optimizer_state_resumes_exactly(non_distributed, name):
    lines = non_distributed["lines"][name]
    oks, steps, weights = _of(lines, "OK"), _of(lines, "STEP"), _of(lines, "WEIGHTS")
    assert len(oks) == len(steps) == len(weights) == 4, lines
    counts = [int(re.search(r": (\d+) optimizer", x).group(1)) for x in oks]
    assert counts == ([21, 18, 18, 24] if ND_JOBS[name][4] == 4 else [81] * 4), oks  # master + 2 moments each
    form = "legacy" if ND_JOBS[name][1] == "megatron_legacy" else "torch_dist"
    assert all(f"{form}, iteration 2, scheduler num_steps 8" in x for x in _of(lines, "STATE")), lines
    # the source's own step at TP=2 PP=2 differs by the order of float sums: in bf16 that is bf16's rounding
    tol = (1e-5, 1e-5) if non_distributed["dtype"] == "fp32" else (1e-3, 3e-2)
    for x in steps:
        ours, megatron, source = re.search(r"loss ([\d.]+) \(Megatron's own resharding ([\d.]+); the source at "
                                           r"tp 2 pp 2 dp 2: ([\d.]+)\)", x).groups()
        assert ours == megatron and abs(float(ours) - float(source)) < tol[0], x
    for x in weights:
        m = re.search(r"(\d+) of (\d+) updated weights equal .* max \|d\| vs the source's step 3 ([\d.e+-]+)", x)
        assert m and m.group(1) == m.group(2) and float(m.group(3)) < tol[1], x


def test_the_non_distributed_entry_is_torch_adams_state(non_distributed):
    import torch

    from reshard.formats import megatron_legacy

    idx = megatron_legacy.read_index(os.path.join(non_distributed["src"], "legacy"), vocab_size=250)
    bf16 = non_distributed["dtype"] == "bf16"
    assert idx.optimizer["sharding"] == "non-distributed optimizer"
    assert idx.optimizer["kinds"] == ["exp_avg", "exp_avg_sq"] + (["fp32_param"] if bf16 else [])
    assert idx.optimizer["step"] == 2.0 and not idx.optimizer["problems"]
    d = os.path.join(non_distributed["out"]["nd_leg_pp4"], "iter_0000002", "mp_rank_00_003")
    state = torch.load(os.path.join(d, "model_optim_rng.pt"), weights_only=False)
    assert not state["args"].use_distributed_optimizer and not os.path.exists(os.path.join(d, "distrib_optim.pt"))
    opt, model = state["optimizer"], state["model"]
    if bf16:  # Float16Optimizer: torch Adam's state under 'optimizer', the fp32 masters per group beside it
        masters, opt = opt["fp32_from_fp16_params"], opt["optimizer"]
        assert [len(g) for g in masters] == [len(g["params"]) for g in opt["param_groups"]]
        assert all(m.dtype == torch.float32 for g in masters for m in g)
    params = [k for k, v in model.items() if isinstance(v, torch.Tensor)]
    assert {model[k].dtype for k in params} == {torch.bfloat16 if bf16 else torch.float32}
    assert [g["wd_mult"] for g in opt["param_groups"]] == [1.0, 0.0]
    assert sorted(i for g in opt["param_groups"] for i in g["params"]) == list(range(len(params)))
    assert all(float(s["step"]) == 2.0 and s["exp_avg"].shape == s["exp_avg_sq"].shape for s in opt["state"].values())
