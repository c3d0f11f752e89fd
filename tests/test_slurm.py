"""A real single-node Slurm cluster (slurmctld, slurmd, munge; started and stopped here) runs
launch/reshard.sbatch: two tasks as two ranks, torchrun under srun, a failing job's exit
code, and a Hydra sweep with one Slurm job per point through hydra-submitit-launcher."""

import glob
import json
import os
import sys

import pytest
import torch

from cluster.slurm import SlurmCluster
from conftest import REPO
from expected import expected_torch_dist, load_hf, read_dcp
from reshard.synthetic import load_preset, write_hf

SBATCH = os.path.join(REPO, "launch", "reshard.sbatch")
ENV = {"RESHARD_PYTHON": sys.executable, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with SlurmCluster(str(tmp_path_factory.mktemp("slurm"))) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("slurm_src") / "hf")
    write_hf(path, load_preset("tiny_llama3"), shards=3)
    return path


def _sbatch(slurm, tmp_path, args, sbatch_opts, env=None):
    p = slurm.run(["sbatch", "--wait", f"--output={tmp_path}/reshard-%j.log", f"--chdir={tmp_path}", *sbatch_opts,
                   SBATCH, *args], env={**ENV, **(env or {})})
    logs = glob.glob(str(tmp_path / "reshard-*.log"))
    assert len(logs) == 1, (p.stdout, p.stderr)
    with open(logs[0]) as f:
        return p, f.read()


def _check(out, src, world):
    tensors, objects = read_dcp(os.path.join(out, "release"))
    spec = objects["common_state/shard_0_1"][0]["reshard"]["spec"]
    expected = expected_torch_dist(load_hf(src), spec, 256)
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())
    with open(os.path.join(out, "reshard_report.json")) as f:
        assert json.load(f)["world_size"] == world


def test_sbatch_with_two_tasks_runs_two_ranks_and_writes_a_correct_checkpoint(slurm, src, tmp_path):
    out = str(tmp_path / "out")
    p, log = _sbatch(slurm, tmp_path, [f"source.path={src}", f"target.path={out}", "parallel.target_tp=2",
                                        "parallel.target_pp=2", f"paths.root={tmp_path}", "io.progress=log"],
                     ["--ntasks=2"])
    assert p.returncode == 0, log
    assert "launch=srun" in log and "on 2 rank(s) (slurm)" in log and log.count("] - wrote ") == 1
    _check(out, src, 2)


def test_sbatch_torchrun_mode_starts_torchrun_per_node(slurm, src, tmp_path):
    out = str(tmp_path / "out")
    p, log = _sbatch(slurm, tmp_path, [f"source.path={src}", f"target.path={out}", "parallel.target_pp=4",
                                        f"paths.root={tmp_path}"], ["--ntasks=1", "--cpus-per-task=2"],
                     env={"RESHARD_LAUNCH": "torchrun", "RESHARD_NPROC_PER_NODE": "2"})
    assert p.returncode == 0, log
    assert "launch=torchrun" in log and "on 2 rank(s) (torchrun)" in log
    _check(out, src, 2)


def test_a_failing_job_exits_non_zero_with_the_reason_in_its_log(slurm, src, tmp_path):
    out = str(tmp_path / "out")
    p, log = _sbatch(slurm, tmp_path, [f"source.path={src}", f"target.path={out}", "parallel.target_tp=3",
                                        f"paths.root={tmp_path}"], ["--ntasks=2"])
    assert p.returncode != 0
    assert "num_attention_heads=4 is not divisible by tp=3" in log
    assert not os.path.exists(out)


def test_a_multirun_sweep_inside_one_sbatch_job_runs_its_points_in_one_process_group(slurm, src, tmp_path):
    p, log = _sbatch(slurm, tmp_path, ["--multirun", f"source.path={src}", f"paths.root={tmp_path}",
                                        "target.path=${paths.root}/pp${parallel.target_pp}",
                                        "parallel.target_pp=1,2,4", "io.progress=none"], ["--ntasks=2"])
    assert p.returncode == 0, log
    assert log.count("] - wrote ") == 3 and log.count("on 2 rank(s) (slurm)") == 3
    for pp in (1, 2, 4):
        _check(str(tmp_path / f"pp{pp}"), src, 2)


def test_a_submitit_sweep_submits_one_slurm_job_per_point(slurm, src, tmp_path):
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (a test dependency: make setup installs it)
    p = slurm.run([sys.executable, "-m", "reshard", "--multirun", "hydra/launcher=reshard_slurm",
                   "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
                   "hydra.launcher.timeout_min=10", f"source.path={src}", f"paths.root={tmp_path}",
                   "target.path=${paths.root}/tp${parallel.target_tp}", "parallel.target_tp=1,2",
                   "io.progress=none"], env=ENV, cwd=str(tmp_path), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    for tp in (1, 2):
        _check(str(tmp_path / f"tp{tp}"), src, 2)
