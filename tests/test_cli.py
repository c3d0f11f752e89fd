"""The user-facing entry point: python -m reshard / torchrun -m reshard, Hydra config
composition, conventional paths, multirun sweeps, rank-aware logging, exit codes."""

import glob
import json
import os

import pytest

import torch

from conftest import REPO, run_reshard
from expected import expected_torch_dist, load_hf, read_dcp
from reshard import config
from reshard.synthetic import load_preset, write_hf


def test_a_preset_alone_gives_the_conventional_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("RESHARD_ROOT", str(tmp_path))
    cfg = config.compose(["+model=llama2_7b", "parallel.target_tp=8"])
    assert cfg.source.path == f"{tmp_path}/llama2_7b/hf"
    assert cfg.target.path == f"{tmp_path}/llama2_7b/torch_dist_tp8_pp1"
    assert cfg.model.num_layers == 32 and cfg.model.ffn_hidden_size == 11008
    cfg = config.compose(["+model=llama3.1_405b", "parallel=tp8_pp4", "parallel.target_vpp=2"])
    assert cfg.target.path.endswith("llama3.1_405b/torch_dist_tp8_pp4_vpp2")


def test_sweep_points_get_distinct_target_directories():
    paths = {config.compose(["source.path=/ckpt/m/hf", f"parallel.target_tp={tp}", f"parallel.target_pp={pp}"])
             .target.path for tp in (1, 2, 4) for pp in (1, 2)}
    assert len(paths) == 6 and all(p.startswith("/ckpt/m/torch_dist_tp") for p in paths)


def test_a_typo_in_an_override_is_an_error_not_ignored():
    with pytest.raises(Exception, match="target_tpp"):
        config.compose(["parallel.target_tpp=2"])


@pytest.fixture
def tiny_root(tmp_path):
    write_hf(str(tmp_path / "tiny_llama3" / "hf"), load_preset("tiny_llama3"), shards=2)
    return tmp_path


def test_torchrun_cli_with_a_preset_works_as_written_and_only_rank_0_writes_hydra_files(tiny_root):
    p = run_reshard(["+model=tiny_llama3", "parallel.target_tp=2", "parallel.target_pp=2", "io.progress=log"],
                    nproc=2, env={"RESHARD_ROOT": str(tiny_root)})
    out = tiny_root / "tiny_llama3" / "torch_dist_tp2_pp2"
    assert (out / "release" / ".metadata").exists()
    assert len(glob.glob(str(tiny_root / "outputs" / "*" / "*" / ".hydra"))) == 1
    assert (tiny_root / "logs" / "torch_dist_tp2_pp2.rank1.log").exists()
    assert not (tiny_root / "logs" / "torch_dist_tp2_pp2.rank0.log").exists()
    console = p.stdout + p.stderr
    assert console.count("] - wrote ") == 1 and "on 2 rank(s) (torchrun)" in console
    assert "rank 0 writing:" in console and "GB/s" in console  # plain progress lines off a terminal


def test_multirun_writes_one_checkpoint_per_sweep_point_in_one_process_group(tiny_root):
    src = tiny_root / "tiny_llama3" / "hf"
    p = run_reshard(["--multirun", f"source.path={src}", f"paths.root={tiny_root}", "parallel.target_tp=1,2",
                     "parallel.target_pp=1,4"], nproc=2)
    hf = load_hf(str(src))
    for tp in (1, 2):
        for pp in (1, 4):
            out = tiny_root / "tiny_llama3" / f"torch_dist_tp{tp}_pp{pp}"
            with open(out / "reshard_report.json") as f:
                r = json.load(f)
            assert r["layout"]["tp"] == tp and r["layout"]["pp"] == pp and r["world_size"] == 2
            tensors, objects = read_dcp(str(out / "release"))
            args = objects["common_state/shard_0_1"][0]["args"]
            assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
            expected = expected_torch_dist(hf, r["spec"], 256)
            assert all(torch.equal(tensors[k], v) for k, v in expected.items())
    assert (p.stdout + p.stderr).count("] - wrote ") == 4
    assert not os.path.exists(os.path.join(REPO, "multirun.yaml"))  # rank 1 wrote nothing into the cwd
    assert (tiny_root / "logs" / "hydra_rank1" / "multirun.yaml").exists()


def test_a_failing_sweep_point_is_reported_and_the_others_still_run(tiny_root):
    src = tiny_root / "tiny_llama3" / "hf"
    p = run_reshard(["--multirun", f"source.path={src}", f"paths.root={tiny_root}", "parallel.target_tp=2,3"],
                    nproc=1, check=False)
    assert p.returncode == 1
    err = p.stdout + p.stderr
    assert "LayoutError" in err and "num_attention_heads=4 is not divisible by tp=3" in err
    assert (tiny_root / "tiny_llama3" / "torch_dist_tp2_pp1" / "release" / ".metadata").exists()
    assert not (tiny_root / "tiny_llama3" / "torch_dist_tp3_pp1").exists()


def test_a_user_error_exits_1_with_the_message_and_no_traceback(tmp_path):
    p = run_reshard([f"source.path={tmp_path}/missing", f"paths.root={tmp_path}"], nproc=1, check=False)
    assert p.returncode == 1
    assert "SourceError" in p.stderr + p.stdout and "does not exist" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr + p.stdout
