"""Trust: every run verified by checksums re-read from the staged output; inspect and compare
any checkpoints; dry runs of the plan."""

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_reshard, run_torchrun

CORRUPT = os.path.join(REPO, "tests", "drivers", "corrupt_staged.py")


def _verdicts(outdir, n):
    return [open(os.path.join(outdir, f"rank{r}.txt")).read() for r in range(n)]


def _nothing_left(target):
    assert not os.path.exists(target)
    assert not glob.glob(os.path.join(os.path.dirname(target), f".{os.path.basename(target)}*"))


def test_a_flipped_bit_in_a_staged_file_fails_the_run_naming_the_tensor(hf_models, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    target = str(tmp_path / "out")
    run_torchrun(2, [CORRUPT, hf_models["llama3"], target, "hf", "flip", name, str(tmp_path)])
    for v in _verdicts(tmp_path, 2):
        assert v.startswith("FAILED VerifyError") and name in v and "1 tensor(s)" in v, v
    _nothing_left(target)


def test_a_tensor_the_writer_dropped_fails_the_run_naming_it(hf_models, tmp_path):
    target = str(tmp_path / "out")
    run_torchrun(3, [CORRUPT, hf_models["qwen2"], target, "megatron_legacy", "drop",
                     "decoder.layers.1.self_attention.linear_qkv.bias", str(tmp_path)])
    for v in _verdicts(tmp_path, 3):
        assert v.startswith("FAILED VerifyError"), v
        assert "decoder.layers.1.self_attention.linear_qkv.bias is absent" in v, v
    _nothing_left(target)


def test_an_honest_run_records_the_verification_in_the_report(hf_models, tmp_path):
    target = str(tmp_path / "out")
    run_reshard([f"source.path={hf_models['mistral']}", f"target.path={target}", "parallel.target_tp=2",
                 f"paths.root={tmp_path}"], nproc=2)
    with open(os.path.join(target, "reshard_report.json")) as f:
        v = json.load(f)["verify"]
    assert v["ok"] and v["tensors"] == 3 + 4 * 9
    assert v["source_bytes_reread"] == v["output_bytes_reread"] > 0


# ---------------------------------------------------------------- inspect / compare

@pytest.fixture(scope="module")
def four_formats(hf_models, tmp_path_factory):
    """The same Llama-3 weights in every format, at different layouts."""
    root = tmp_path_factory.mktemp("formats")
    src = hf_models["llama3"]
    out = {"hf": src}
    for name, extra in (("torch_dist", ["parallel.target_tp=2", "parallel.target_pp=2"]),
                        ("megatron_legacy", ["target.format=megatron_legacy", "parallel.target_tp=2",
                                             "parallel.target_pp=2", "parallel.target_vpp=2"]),
                        ("meta", ["target.format=meta", "target.meta_shards=2"])):
        out[name] = str(root / name)
        run_reshard([f"source.path={src}", f"target.path={out[name]}", f"paths.root={root}", *extra], nproc=1)
    return out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "reshard", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, timeout=300)


@pytest.mark.parametrize("fmt", ["hf", "torch_dist", "megatron_legacy", "meta"])
def test_inspect_every_format(four_formats, fmt):
    p = _cli("inspect", four_formats[fmt], "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["format"] == fmt and info["problems"] == []
    a = info["architecture"]
    assert (a["num_layers"], a["num_query_groups"], a["vocab_size"]) == (4, 2, 250)
    assert info["canonical_tensors"] == 3 + 4 * 9 and info["tensors"]
    text = _cli("inspect", four_formats[fmt]).stdout
    assert "problems: none" in text and "architecture: llama, 4 layers" in text
    if fmt == "megatron_legacy":
        assert info["layout"]["vpp"] == 2 and info["files"] == 4


def test_inspect_names_what_is_missing(four_formats, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(four_formats["megatron_legacy"], broken)
    shutil.rmtree(os.path.join(broken, "release", "mp_rank_01_001"))
    p = _cli("inspect", broken)
    assert p.returncode == 1
    assert "PROBLEMS" in p.stdout and "missing: mp_rank_01_001" in p.stdout


@pytest.mark.parametrize("a,b", [("hf", "torch_dist"), ("megatron_legacy", "meta"), ("torch_dist", "meta")])
def test_compare_equal_across_formats_and_layouts(four_formats, a, b):
    p = _cli("compare", four_formats[a], four_formats[b])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "39 of 39 canonical tensors equal" in p.stdout and p.stdout.strip().endswith("EQUAL")


def test_compare_names_a_perturbed_weight_distributed_over_ranks(four_formats, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    hf = str(tmp_path / "hf")
    shutil.copytree(four_formats["hf"], hf)
    name = "model.layers.2.self_attn.k_proj.weight"
    with open(os.path.join(hf, "model.safetensors.index.json")) as f:
        file = os.path.join(hf, json.load(f)["weight_map"][name])
    sd = load_file(file)
    sd[name][3, 5] += 0.5
    save_file(sd, file, metadata={"format": "pt"})
    p = run_torchrun(2, ["-m", "reshard", "compare", hf, four_formats["torch_dist"]], check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"DIFFERS {name}: max abs diff 0.5, first at [3, 5]" in p.stdout
    assert "38 of 39 canonical tensors equal" in p.stdout
    p = _cli("compare", hf, four_formats["torch_dist"], "--atol", "0.6")  # within tolerance
    assert p.returncode == 0


# ---------------------------------------------------------------- dry run

def test_dry_run_moves_no_data_and_reports_per_rank(hf_models, tmp_path):
    target = str(tmp_path / "out")
    p = run_reshard([f"source.path={hf_models['llama3']}", f"target.path={target}", "dry_run=true",
                     "dry_run_world=64", "parallel.target_tp=2", "parallel.target_pp=2", "io.assign=layout",
                     "io.buffer_mb=0.001", f"paths.root={tmp_path}"], nproc=1)
    out = p.stdout + p.stderr
    assert "dry run: 64 rank(s)" in out and "est peak MB" in out
    assert "idle rank(s)" in out and "larger than the exchange buffer" in out
    assert not os.path.exists(target)


def test_a_sparse_405b_checkpoint_plans_for_1024_ranks_through_the_cli(tmp_path):
    """Headers only (the data is a hole): the real CLI dry-runs a 405B layout at 1,024 ranks."""
    from reshard.formats import hf
    from reshard.synthetic import load_preset, write_hf_sparse

    src = str(tmp_path / "hf")
    info = write_hf_sparse(src, load_preset("llama3.1_405b"), files=24)
    index = hf.read_index(src)
    assert index.total_bytes == info["bytes"] == 2 * 405_853_388_800
    p = run_reshard([f"source.path={src}", f"target.path={tmp_path / 'out'}", "+model=llama3.1_405b",
                     "dry_run=true", "dry_run_world=1024", "parallel.target_tp=8", "parallel.target_pp=16",
                     "parallel.target_first_stage_layers=7", "parallel.target_last_stage_layers=7",
                     f"paths.root={tmp_path}"], nproc=1)
    out = p.stdout + p.stderr
    assert "dry run: 1024 rank(s)" in out and "warnings: none" in out
    assert not os.path.exists(tmp_path / "out")
