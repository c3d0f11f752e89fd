"""Nothing dropped silently: the training state a Megatron checkpoint holds beside the weights (optimizer,
scheduler, RNG, distrib_optim.pt) is not converted by this version - and every run says so, in the log,
``reshard_report.json`` and ``reshard inspect``, with the bytes it leaves behind."""

import io
import json
import os

import pytest
import torch

from conftest import read_json, run_reshard


def _add_training_state_legacy(ckpt):
    """Megatron's entries beside the model in each rank file, and a distributed optimizer's file."""
    for d in sorted(os.listdir(ckpt)):
        path = os.path.join(ckpt, d, "model_optim_rng.pt")
        if not os.path.isfile(path):
            continue
        obj = torch.load(path, weights_only=False)
        w = obj["model"]["decoder.final_layernorm.weight"]
        obj["optimizer"] = {"optimizer": {"state": {0: {"exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.ones_like(w),
                                                         "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]},
                            "fp32_from_fp16_params": [[w.float()]]}
        obj["opt_param_scheduler"] = {"num_steps": 3}
        obj["rng_state"] = [{"random_rng_state": None, "torch_rng_state": torch.get_rng_state()}]
        torch.save(obj, path)
        torch.save({"param_state": torch.zeros(100)}, os.path.join(ckpt, d, "distrib_optim.pt"))


def _add_training_state_dcp(ckpt, key_of):
    """The same checkpoint re-saved with plain DCP plus optimizer and RNG entries."""
    import torch.distributed.checkpoint as dcp

    from tests.expected import read_dcp

    tensors, objects = read_dcp(ckpt)
    state = dict(tensors)
    state.update(objects)
    for k, t in list(tensors.items())[:3]:
        state[key_of(k, "exp_avg")] = torch.zeros_like(t, dtype=torch.float32)
    state["rng_state"] = io.BytesIO(b"rng")
    beside = [f for f in os.listdir(ckpt) if f == "metadata.json"]
    for f in os.listdir(ckpt):
        os.remove(os.path.join(ckpt, f))
    planner = dcp.DefaultSavePlanner(flatten_state_dict=False)  # objects stay one byte entry each, as Megatron's
    dcp.save(state, checkpoint_id=ckpt, no_dist=True, planner=planner)
    for f in beside:
        with open(os.path.join(ckpt, f), "w") as fh:
            json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, fh)


@pytest.fixture(scope="module")
def sources(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("nc")
    hf = hf_models["llama3"]
    out = {k: str(root / k) for k in ("torch_dist", "megatron_legacy", "fsdp_dtensor")}
    for fmt, path in out.items():
        run_reshard([f"source.path={hf}", f"target.path={path}", f"target.format={fmt}", f"paths.root={root}"]
                    + (["parallel.target_tp=2"] if fmt == "megatron_legacy" else []))
    _add_training_state_legacy(os.path.join(out["megatron_legacy"], "release"))
    _add_training_state_dcp(os.path.join(out["torch_dist"], "release"),
                            lambda k, s: f"optimizer.state.{s}.{k}")
    _add_training_state_dcp(os.path.join(out["fsdp_dtensor"], "release"),
                            lambda k, s: f"optimizer.state.module.module.module.{k[len('model.module.'):]}.{s}")
    return root, out


@pytest.mark.parametrize("fmt,kinds", [
    ("megatron_legacy", {"optimizer state", "learning-rate scheduler state", "RNG state", "distributed optimizer state"}),
    ("torch_dist", {"optimizer state", "RNG state"}),
    ("fsdp_dtensor", {"optimizer state", "RNG state"}),
])
def test_training_state_is_named_in_the_log_the_report_and_inspect(sources, fmt, kinds):
    root, src = sources
    target = str(root / f"{fmt}_to_hf")
    p = run_reshard([f"source.path={src[fmt]}", f"target.path={target}", "target.format=hf", f"paths.root={root}"])
    line = next(x for x in (p.stdout + p.stderr).splitlines() if "not carried: the source also holds" in x)
    assert all(k in line for k in kinds), line
    rep = read_json(os.path.join(target, "reshard_report.json"))["not_carried"]
    assert set(rep) == kinds and rep["optimizer state"]["bytes"] > 0, rep
    if fmt == "megatron_legacy":  # two rank files, each with its entries and its distrib_optim.pt
        assert rep["optimizer state"]["entries"] == 2 and rep["distributed optimizer state"]["bytes"] > 2 * 400
    else:
        assert rep["optimizer state"]["entries"] == 3
    ins = run_reshard(["inspect", src[fmt]], check=False)
    assert "not converted by this version (training state beside the weights): " in ins.stdout
    assert all(k in ins.stdout for k in kinds)
    assert "NOT CARRIED" in run_reshard_report(target)


def run_reshard_report(target):
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run([sys.executable, "-m", "reshard.report", target], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), check=True).stdout


def test_a_weights_only_source_reports_nothing_not_carried(hf_models, tmp_path):
    target = str(tmp_path / "td")
    run_reshard([f"source.path={hf_models['llama3']}", f"target.path={target}", f"paths.root={tmp_path}"])
    assert read_json(os.path.join(target, "reshard_report.json"))["not_carried"] == {}
