"""Who am I and who do I talk to: torchrun, srun and single-process environments."""

import pytest

from megatron_foresight.runtime.dist import expand_first_host, read_launch_env


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr,
            launch.master_port, launch.launcher) == (3, 4, 1, "n1", 1234, "torchrun")


def test_srun_step_gives_rank_world_and_rendezvous():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (5, 16, 5)
    assert launch.master_addr == "gpu007"
    assert launch.master_port == 20000 + 123456 % 20000
    assert launch.launcher == "slurm"


def test_sbatch_script_outside_srun_is_a_single_process():
    # The batch step has SLURM_PROCID and SLURM_NTASKS but is not an srun step.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "1"}
    assert read_launch_env(env).launcher == "single"
    assert read_launch_env({}).world_size == 1


@pytest.mark.parametrize("nodelist, first", [
    ("node01", "node01"), ("gpu[003-005,9]", "gpu003"), ("a[1,3],b7", "a1"),
    ("h100-[12-14]", "h100-12"),
])
def test_first_host_of_a_nodelist(nodelist, first):
    assert expand_first_host(nodelist) == first


def test_each_process_gets_its_own_gpu_and_too_many_are_refused():
    from megatron_foresight.errors import UsageError
    from megatron_foresight.runtime.dist import cuda_device

    assert [cuda_device(r, 8) for r in range(8)] == list(range(8))
    assert cuda_device(5, 1) == 0  # one GPU per task (Slurm binds it): the one it sees
    with pytest.raises(UsageError, match="local rank 8 on a node showing 8 GPUs"):
        cuda_device(8, 8)
