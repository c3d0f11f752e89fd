"""Rank environment detection for the three ways reshard is started: torchrun, srun without
torchrun, and a plain single process - and the Slurm node-list parsing behind it."""

import pytest

from reshard.dist import detect_env, first_slurm_host


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    e = detect_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3, 8, 1, "n1", 29500, "torchrun")


def test_srun_tasks_are_ranks_with_the_master_from_the_node_list():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_NODELIST": "gpu[017-020]", "SLURM_JOB_NODELIST": "gpu[017-020]"}
    e = detect_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (5, 16, 1, "slurm")
    assert e.master_addr == "gpu017" and e.master_port == 20000 + 4242


def test_srun_honours_an_explicit_master():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a,b", "MASTER_ADDR": "b",
           "MASTER_PORT": "1234"}
    e = detect_env(env)
    assert (e.master_addr, e.master_port) == ("b", 1234)


@pytest.mark.parametrize("env", [{}, {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}])
def test_a_plain_process_or_a_one_task_allocation_is_a_single_rank(env):
    e = detect_env(env)
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")


@pytest.mark.parametrize("nodes,first", [("node03", "node03"), ("node[03-05,9]", "node03"),
                                         ("gpu[1,4],cpu7", "gpu1"), ("a-b-1,a-b-2", "a-b-1"),
                                         ("rack2-n[0012-0016]", "rack2-n0012")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert first_slurm_host(nodes) == first
