"""Megatron distributed checkpoints: atomic saves, exact resume, loading at another TP/PP size.

Layout under a run directory:

    checkpoints/
      step_0000050/        a complete dist_checkpointing directory (torch_dist format)
      step_0000100/
      latest               the name of the newest complete checkpoint

Atomicity: a checkpoint is written into `step_N.tmp`, and only once every rank has finished is
it renamed to `step_N` and `latest` replaced (write-then-rename, so `latest` is never partial). A
crash mid-save leaves a `.tmp` directory that is never loaded and is removed by the next save of
that step; the previous checkpoint is untouched. Old checkpoints are pruned only after the new
one is complete.

What a checkpoint holds: model and optimizer state as sharded tensors (reshardable: loading at a
different TP/PP size works); the LR schedule, the step and consumed samples, and the parallel
layout in the common state; each rank's RNG state. RNG states belong to a (pp, tp, dp) position,
so they are restored only when the layout is unchanged (as Megatron-LM does); training at a new
layout continues with fresh RNG streams, which only matters for dropout.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from megatron_foresight.errors import UsageError
from megatron_foresight.runtime.dist import ParallelContext, barrier, is_rank0
from megatron_foresight.runtime.seed import get_rng_state, set_rng_state
from megatron_foresight.training.optimizer import ensure_adam_state

log = logging.getLogger(__name__)

LATEST = "latest"


class CheckpointError(UsageError):
    """A checkpoint that cannot be used the way this run asks; the message says what to do."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _model_state(chunks: list, metadata: dict) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": c.sharded_state_dict(metadata=metadata) for i, c in enumerate(chunks)}


def _rng_object(ctx: ParallelContext, state):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", state, (ctx.pp_size, ctx.tp_size, ctx.dp_size),
                         (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank), replica_id=0)


def _metadata(optimizer_sharding: str) -> dict:
    return {"distrib_optim_sharding_type": optimizer_sharding, "chained_optim_avoid_prefix": True}


def save_checkpoint(root: Path, step: int, *, chunks: list, optimizer, scheduler,
                    ctx: ParallelContext, consumed_samples: int, config: dict, keep_last: int,
                    save_optimizer: bool = True, optimizer_sharding: str = "fully_reshardable"
                    ) -> Path:
    """Save `step` atomically; `optimizer=None` (or save_optimizer=False) saves weights only,
    which can start a run (checkpoint.init_from) or be converted, but not resume one."""
    from megatron.core import dist_checkpointing

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        tmp.mkdir(parents=True)
    barrier()
    metadata = _metadata(optimizer_sharding)
    state = _model_state(chunks, metadata)
    save_optimizer = save_optimizer and optimizer is not None
    if save_optimizer:
        ensure_adam_state(optimizer)  # a stop before the first step saves too
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["progress"] = {"step": step, "consumed_samples": consumed_samples}
    state["layout"] = ctx.layout
    state["config"] = config
    state["has_optimizer"] = save_optimizer
    state["rng_state"] = _rng_object(ctx, get_rng_state())
    dist_checkpointing.save(state, str(tmp))
    barrier()
    if is_rank0():
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / LATEST)
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """Resolve a run directory, a `checkpoints/` directory or a checkpoint directory to the
    newest complete checkpoint it names; None if there is none."""
    path = Path(path)
    if (path / "metadata.json").exists() and not path.name.endswith(".tmp"):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = root / LATEST
    if latest.exists():
        candidate = root / latest.read_text().strip()
        if (candidate / "metadata.json").exists():
            return candidate
    complete = sorted(p for p in root.glob("step_*")
                      if not p.name.endswith(".tmp") and (p / "metadata.json").exists())
    return complete[-1] if complete else None


def read_common(path: Path) -> dict:
    """The non-sharded part of a checkpoint (progress, layout, schedule, config)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path))


def _check_optimizer_kind(path: Path, common: dict, distributed_optimizer: bool) -> None:
    # Megatron-Core stores the distributed optimizer's state in another structure (flat buffers
    # mapped to parameters, param groups by name) than the plain one: it reshards across TP, PP
    # and DP, but does not convert from one kind to the other.
    saved = common.get("config", {}).get("parallel", {}).get("use_distributed_optimizer")
    if saved is not None and saved != distributed_optimizer:
        raise CheckpointError(
            f"{path} was saved with parallel.use_distributed_optimizer={str(saved).lower()} and "
            f"this run has {str(distributed_optimizer).lower()}: optimizer state does not convert "
            f"between the two. Resume with parallel.use_distributed_optimizer="
            f"{str(saved).lower()} (any TP/PP/DP size), or start from its weights with a fresh "
            "optimizer: checkpoint.init_from=<that run dir> in a new run directory.")


def load_checkpoint(path: Path, *, chunks: list, ctx: ParallelContext, optimizer=None,
                    scheduler=None, optimizer_sharding: str = "fully_reshardable",
                    distributed_optimizer: bool = False, fresh: tuple[str, ...] = ()) -> dict:
    """Load model weights, and when `optimizer` is given the optimizer, schedule and RNG too.
    `fresh`: prefixes of model state this run adds to the checkpoint's model (a stage's new
    module, such as PPO's value head), which are not read and keep their initial values.
    Returns the checkpoint's common state (progress, layout, config)."""
    from megatron.core import dist_checkpointing

    common = read_common(path)
    metadata = _metadata(optimizer_sharding)
    template = _model_state(chunks, metadata)
    if fresh:
        for state in template.values():
            for key in [k for k in state if k.startswith(fresh)]:
                del state[key]
    if optimizer is not None:
        if not common.get("has_optimizer", True):
            raise CheckpointError(f"{path} was saved without optimizer state "
                               "(checkpoint.save_optimizer=false); it cannot be resumed exactly. "
                               "Start from it with checkpoint.init_from instead.")
        _check_optimizer_kind(path, common, distributed_optimizer)
        ensure_adam_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(template, is_loading=True,
                                                             metadata=metadata)
    same_layout = common.get("layout") == ctx.layout
    if optimizer is not None and same_layout:
        template["rng_state"] = _rng_object(ctx, None)
    loaded = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(chunks):
        state = loaded["model" if len(chunks) == 1 else f"model{i}"]
        if fresh:
            own = getattr(chunk, "module", chunk).state_dict()  # unwrapped, as loaded
            state.update({k: v for k, v in own.items() if k.startswith(fresh)})
        chunk.load_state_dict(state)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        if same_layout:
            set_rng_state(loaded["rng_state"])
        else:
            log.warning("checkpoint layout %s differs from this run's %s: model and optimizer "
                        "resharded; RNG streams start fresh", common.get("layout"), ctx.layout)
    return common


def start_writer_immune_to_stop_signals() -> None:
    """Start Megatron's checkpoint-writer result queue now, with SIGTERM and SIGUSR1 blocked.

    dist_checkpointing reports its writes through a Manager process that it spawns on the first
    save. A spawned process starts with default signal handlers, and Slurm delivers its stop
    signals (SIGUSR1 before the time limit, SIGTERM on preemption) to every process of a job
    step: the Manager died and the very save the signal asked for failed with BrokenPipeError
    (seen with slurm/tiny_cpu.sh). A process inherits the blocked-signal mask across exec, so the
    Manager started here never sees them; the training process handles them as before."""
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    stop = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

