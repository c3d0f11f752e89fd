"""Shared fixtures: tiny real checkpoints (saved by transformers) and real multi-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# family fixture name -> conf/model preset it is built from
FAMILIES = {"llama2": "tiny_llama2", "llama3": "tiny_llama3", "mistral": "tiny_mistral", "qwen2": "tiny_qwen2"}


def run_torchrun(nproc: int, args, timeout: int = 300, env=None, check: bool = True, cwd=None):
    """Run ``torchrun --standalone --nproc-per-node N <args>``; returns CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    e = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd or REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}): {' '.join(cmd)}\n--- stdout\n{p.stdout[-4000:]}"
                             f"\n--- stderr\n{p.stderr[-8000:]}")
    return p


def run_reshard(overrides, nproc: int = 1, timeout: int = 300, check: bool = True, env=None):
    """The real CLI: ``python -m reshard`` (nproc=1) or ``torchrun -m reshard``."""
    if nproc == 1:
        e = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **(env or {}))
        p = subprocess.run([sys.executable, "-m", "reshard", *overrides], capture_output=True, text=True,
                           timeout=timeout, env=e, cwd=REPO)
        if check and p.returncode != 0:
            raise AssertionError(f"reshard failed ({p.returncode})\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
        return p
    return run_torchrun(nproc, ["-m", "reshard", *overrides], timeout=timeout, env=env, check=check)


def run_jobs(nproc: int, jobs, root, name: str) -> list:
    """Several conversions in one process group (``tests/drivers/convert_jobs.py`` under torchrun);
    every job must succeed. ``jobs`` is a list of override lists; returns the drivers' results."""
    jf, rf = str(root / f"{name}.json"), str(root / f"{name}_results.json")
    with open(jf, "w") as f:
        json.dump(jobs, f)
    run_torchrun(nproc, [os.path.join(REPO, "tests", "drivers", "convert_jobs.py"), jf, rf], timeout=600)
    results = read_json(rf)
    assert all(r["ok"] for r in results), results
    return results


def save_transformers_model(preset: str, out: str, max_shard_size: str = "60KB", seed: int = 0) -> str:
    """Build a random model of ``preset`` with transformers and ``save_pretrained`` it (several shards)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from reshard.spec import to_hf_config
    from reshard.synthetic import load_preset

    spec = load_preset(preset)
    cfg = to_hf_config(spec)
    model_type = cfg.pop("model_type")
    cfg.pop("architectures")
    cfg.pop("torch_dtype")
    if cfg.get("rope_scaling") is None:
        cfg.pop("rope_scaling")
    torch.manual_seed(seed)
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(hf_cfg).float()
    with torch.no_grad():  # norms at 1.0 would hide a norm/norm swap
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():  # DeepSeek-V3's router score correction: a buffer, zero at init
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.1)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """family -> directory of a tiny model saved by transformers (float32, several shards)."""
    root = tmp_path_factory.mktemp("hf")
    return {fam: save_transformers_model(preset, str(root / fam)) for fam, preset in FAMILIES.items()}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def pytest_terminal_summary(terminalreporter):
    """The fault-injection totals (tests/test_faults.py), when that module ran."""
    mod = sys.modules.get("test_faults")
    lines = mod.fault_totals() if mod is not None else []
    if lines:
        terminalreporter.write_sep("=", "fault injection totals")
        for line in lines:
            terminalreporter.write_line(line)
