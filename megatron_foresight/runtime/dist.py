"""torch.distributed and Megatron parallel state, from torchrun or Slurm environment variables.

Launchers and what they set:
* torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
* srun (one task per GPU or per CPU process): SLURM_PROCID, SLURM_STEP_NUM_TASKS,
  SLURM_LOCALID, SLURM_STEP_NODELIST; the rendezvous address is the step's first node and the
  port is derived from the job id, so every task computes the same one without talking.
  SLURM_STEP_NUM_TASKS exists only inside an `srun` step, so a command run directly in an
  sbatch script (not under srun) is a single process, as it should be.
* neither: a single process, with an in-memory store (no port needed).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    launcher: str  # "torchrun", "slurm" or "single"


def expand_first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot read Slurm nodelist {nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ=None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                         "torchrun")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
        addr = env.get("MASTER_ADDR") or expand_first_host(nodelist)
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return LaunchEnv(0, 1, 0, None, None, "single")


def cuda_device(local_rank: int, visible: int) -> int:
    """The GPU of the process with this node-local rank, `visible` GPUs showing: its own when
    each process sees only one (Slurm's per-task binding), else the local rank's; more processes
    than GPUs on a node is refused here rather than as NCCL's "Duplicate GPU detected"."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        from megatron_foresight.errors import UsageError

        raise UsageError(f"process of local rank {local_rank} on a node showing {visible} GPUs: "
                         "start one process per GPU (torchrun --nproc_per_node, srun "
                         "--ntasks-per-node at most the GPUs per node)")
    return local_rank


def init_distributed(launch: LaunchEnv, timeout_minutes: int = 30) -> str:
    """Start torch.distributed: NCCL with CUDA, gloo (plus the CPU compatibility layer) without.
    Returns the device type."""
    timeout = timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        # One hardware queue keeps tensor-parallel communication kernels ordered ahead of the
        # compute they overlap with (what Megatron-LM's launch scripts set); must precede the
        # CUDA context.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(cuda_device(launch.local_rank, torch.cuda.device_count()))
        backend, device = "nccl", "cuda"
    else:
        from megatron_foresight.runtime import compat
        compat.install()
        backend, device = "gloo", "cpu"
    if launch.launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:"
                                f"{launch.master_port}", rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout)
    log.debug("torch.distributed: %s, rank %d of %d (%s)", backend, launch.rank,
              launch.world_size, launch.launcher)
    return device


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the parallel grid, and the groups that span it. Code outside
    runtime/ receives this instead of reading Megatron's module-level state."""

    device: str
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    cp_size: int
    dp_group: object
    pp_group: object
    tp_group: object
    pg_collection: object

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The one process that writes metrics: it holds the loss (last stage) and is the first
        of its tensor- and data-parallel groups."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    @property
    def layout(self) -> dict:
        return {"tp": self.tp_size, "pp": self.pp_size, "dp": self.dp_size, "cp": self.cp_size}


def init_parallel_state(parallel, device: str) -> ParallelContext:
    """Megatron parallel state (TP, PP with optional virtual stages, CP, EP; DP is the rest)."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    return ParallelContext(
        device=device, rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
        dp_group=ps.get_data_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (rank 0 decides, e.g. the run dir)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def spawn_local(nprocs: int, fn, *args, cpu_only: bool = False) -> None:
    """Run `fn(*args)` on `nprocs` new processes on this machine that find each other as torchrun
    would arrange (RANK, WORLD_SIZE, MASTER_ADDR/PORT set per child, one thread each): for tools
    started as a plain command that need a process per TP/PP rank. `cpu_only` hides GPUs from
    the children (gloo). If one fails, the others get a few seconds to finish or fail on their
    own, then are stopped; the failure is raised as SystemExit with that process's status."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_spawned, args=(rank, nprocs, port, cpu_only, fn, args))
             for rank in range(nprocs)]
    for p in procs:
        p.start()
    failed = None
    while failed is None and any(p.is_alive() for p in procs):
        failed = next((p for p in procs if p.exitcode not in (None, 0)), None)
        time.sleep(0.2)
    failed = failed or next((p for p in procs if p.exitcode != 0), None)
    if failed is not None:
        deadline = time.monotonic() + 5
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    if failed is not None:
        rank, code = procs.index(failed), failed.exitcode
        if code != 2:  # 2: a user error the process has already explained
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            print(f"error: process {rank} of {nprocs} {how}", file=sys.stderr)
        raise SystemExit(code if code > 0 else 1)


def _spawned(rank: int, world_size: int, port: int, cpu_only: bool, fn, args) -> None:
    from megatron_foresight.configtree import ConfigError
    from megatron_foresight.errors import UsageError

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if cpu_only:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA first initializes, not before
    try:
        fn(*args)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)  # every rank: the first to fail may not be rank 0
        sys.exit(2)
