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
one is complete, and never the newest one saved after a finite step.

Integrity (`integrity.py`): each checkpoint holds a manifest of its files' sizes and SHA-256,
written before the rename and verified before any load; `--resume` passes over a damaged
checkpoint to the newest intact one and says so. A `latest` that is unreadable or names no
complete checkpoint is ignored with a warning (the newest complete checkpoint is used).

What a checkpoint holds: model and optimizer state as sharded tensors (reshardable: loading at a
different TP/PP size works); the LR schedule, the step and consumed samples, and the parallel
layout in the common state; each rank's RNG state. RNG states belong to a (pp, tp, dp) position,
so they are restored only when the layout is unchanged (as Megatron-LM does); training at a new
layout continues with fresh RNG streams, which only matters for dropout.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from megatron_foresight.errors import UsageError
from megatron_foresight.runtime import lifetime, untrusted
from megatron_foresight.runtime.dist import ParallelContext, barrier, is_rank0
from megatron_foresight.runtime.seed import get_rng_state, set_rng_state
from megatron_foresight.training import integrity
from megatron_foresight.training.integrity import CheckpointDamaged
from megatron_foresight.training.optimizer import ensure_adam_state

log = logging.getLogger(__name__)

LATEST = "latest"
STEP_NAME = re.compile(r"step_\d{7}")


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
                    save_optimizer: bool = True, optimizer_sharding: str = "fully_reshardable",
                    finite: bool = True, nonfinite_skipped: int = 0) -> Path:
    """Save `step` atomically; `optimizer=None` (or save_optimizer=False) saves weights only,
    which can start a run (checkpoint.init_from) or be converted, but not resume one.
    `finite`: the step trained on finite losses and gradients (see `_prune`)."""
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
    state["progress"] = {"step": step, "consumed_samples": consumed_samples,
                         "nonfinite_skipped": nonfinite_skipped}
    state["layout"] = ctx.layout
    state["config"] = config
    state["has_optimizer"] = save_optimizer
    state["rng_state"] = _rng_object(ctx, get_rng_state())
    _save_or_explain(state, tmp)
    barrier()
    integrity.write_manifest(tmp, step, finite)
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


def _save_or_explain(state: dict, tmp: Path) -> None:
    """dist_checkpointing.save, with a full disk named as such: torch reports it from deep in
    its writer ("unexpected pos 704 vs 598") without the path or the cause."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        dist_checkpointing.save(state, str(tmp))
    except (Exception, CheckpointException) as e:
        if not _disk_full(e, tmp):
            raise
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"no space left on device while saving checkpoint {tmp.name} into {tmp.parent} "
            f"({shutil.disk_usage(tmp.parent).free >> 20} MiB free now). The previous checkpoint "
            "is intact: free space (or lower checkpoint.keep_last) and continue with --resume"
        ) from e


# How a full disk (or quota) shows through torch's and Megatron's writers: an OSError, the
# worker's OSError as text ("Worker failure: [Errno 28] ..."), or the short write found by
# torch's zip writer ("unexpected pos 704 vs 598").
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = (*map(os.strerror, _FULL_ERRNOS), "unexpected pos")


def _disk_full(error: BaseException, where: Path) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        for e in (seen, _first_failure(seen)):
            if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
                return True
            if any(text in str(e) for text in _FULL_TEXTS):
                return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(where.parent).free < (1 << 20)
    except OSError:
        return False


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints, and the newest one whose step was finite if
    that is older (a run that went non-finite under optimizer.skip_nonfinite keeps a sound
    state to go back to)."""
    complete = complete_checkpoints(root)
    keep = set(complete[:keep_last])
    for path in complete:
        if _finite(path):
            keep.add(path)
            break
    for old in complete:
        if old not in keep:
            _remove(old)
    for leftover in root.glob("step_*.pruned"):  # a crash during an earlier prune
        shutil.rmtree(leftover, ignore_errors=True)


def _remove(path: Path) -> None:
    """Rename first: a crash halfway through deleting must not leave a directory that still
    looks like a complete checkpoint (metadata.json present, tensor files gone)."""
    doomed = path.with_name(path.name + ".pruned")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _finite(path: Path) -> bool:
    try:
        manifest = integrity.read_manifest(path)
    except CheckpointDamaged:
        return False
    return manifest is None or bool(manifest.get("finite", True))


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under a `checkpoints/` directory, newest first."""
    return sorted((p for p in root.glob("step_*")
                   if STEP_NAME.fullmatch(p.name) and (p / "metadata.json").is_file()),
                  reverse=True)


def _named_by_latest(root: Path) -> Path | None:
    latest = root / LATEST
    if not latest.exists():
        return None
    try:
        name = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        log.warning("%s cannot be read (%s): using the newest complete checkpoint", latest, e)
        return None
    candidate = root / name
    if STEP_NAME.fullmatch(name) and (candidate / "metadata.json").is_file():
        return candidate
    log.warning("%s names %r, which is not a complete checkpoint there: using the newest "
                "complete checkpoint", latest, name[:80])
    return None


def _checkpoints_root(path: Path) -> Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def find_checkpoint(path: str | Path) -> Path | None:
    """Resolve a run directory, a `checkpoints/` directory or a checkpoint directory to the
    newest complete checkpoint it names; None if there is none."""
    path = Path(path)
    if (path / "metadata.json").is_file() and not path.name.endswith(".tmp"):
        return path
    root = _checkpoints_root(path)
    named = _named_by_latest(root)
    if named is not None:
        return named
    complete = complete_checkpoints(root)
    return complete[0] if complete else None


def resume_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints a resume may use, in the order to try them: the one `latest` names,
    then every other complete one, newest first."""
    root = _checkpoints_root(run_dir)
    first = _named_by_latest(root)
    rest = [p for p in complete_checkpoints(root) if p != first]
    return ([first] if first else []) + rest


def read_common(path: Path) -> dict:
    """The non-sharded part of a checkpoint (progress, layout, schedule, config)."""
    from megatron.core import dist_checkpointing

    untrusted.install()  # before the first byte of any checkpoint is unpickled
    try:
        return dist_checkpointing.load_common_state_dict(str(path))
    except UsageError:
        raise
    except Exception as e:  # torch.load of a truncated, empty or missing common.pt
        raise CheckpointError(f"{path / 'common.pt'} cannot be read ({type(e).__name__}: "
                              f"{str(e).strip()[:200]}): the checkpoint is damaged or "
                              "incomplete; use another checkpoint (an earlier step_N)") from e


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


def _check_precision(path: Path, common: dict, precision: str | None) -> None:
    # bf16/fp16 optimizers keep fp32 master copies of the weights, an fp32 one does not: their
    # states have other structures (resuming across them failed with a KeyError in Megatron).
    saved = common.get("config", {}).get("model", {}).get("precision")
    if precision is None or saved not in ("fp32", "bf16", "fp16") or saved == precision:
        return
    raise CheckpointError(
        f"{path} was saved with model.precision={saved} and this run has {precision}: optimizer "
        f"state does not convert between the two. Resume with model.precision={saved} (auto "
        "keeps the saved one on --resume), or start from its weights with a fresh optimizer: "
        "checkpoint.init_from=<that run dir> in a new run directory.")


def load_checkpoint(path: Path, *, chunks: list, ctx: ParallelContext, optimizer=None,
                    scheduler=None, optimizer_sharding: str = "fully_reshardable",
                    distributed_optimizer: bool = False, fresh: tuple[str, ...] = (),
                    precision: str | None = None) -> dict:
    """Load model weights, and when `optimizer` is given the optimizer, schedule and RNG too.
    `fresh`: prefixes of model state this run adds to the checkpoint's model (a stage's new
    module, such as PPO's value head), which are not read and keep their initial values.
    `precision`: the run's model.precision, which must be the checkpoint's to load its
    optimizer (weights alone load into any precision).
    Returns the checkpoint's common state (progress, layout, config).
    Raises CheckpointDamaged, before anything is loaded, if the files differ from the
    checkpoint's manifest."""
    integrity.verify(path)
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
        _check_precision(path, common, precision)
        ensure_adam_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(template, is_loading=True,
                                                             metadata=metadata)
    same_layout = common.get("layout") == ctx.layout
    if optimizer is not None and same_layout:
        template["rng_state"] = _rng_object(ctx, None)
    loaded = _load_or_explain(template, path)
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


def _load_or_explain(template: dict, path: Path) -> dict:
    """dist_checkpointing.load with its failures named: a model whose shapes differ from the
    checkpoint's (Megatron: "Global shape mismatch" deep in a stack) or files it cannot read."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(template, str(path))
    except (CheckpointingException, CheckpointException) as e:
        cause = _first_failure(e)
        text = str(cause).strip()
        line = (text.splitlines() or [type(cause).__name__])[0][:300]
        if "shape mismatch" in text.lower():
            raise CheckpointError(
                f"{path} does not fit this model: {line}. The checkpoint was saved with "
                "another model shape; use the recipe it was trained with (its model: section is "
                "in the run's config.yaml), or a checkpoint of this model") from e
        raise CheckpointError(f"{path} cannot be loaded ({type(cause).__name__}: {line}): one "
                              "of its files is unreadable, truncated or damaged; use another "
                              "checkpoint (an earlier step_N)") from e


def _first_failure(error: BaseException) -> BaseException:
    """torch's CheckpointException gathers each rank's exception; the first one is the cause."""
    failures = getattr(error, "failures", None)
    if not failures:
        return error
    first = next(iter(failures.values()))  # (exception, its stack summary)
    return first[0] if isinstance(first, tuple) else first


def start_writer_immune_to_stop_signals() -> None:
    """Start Megatron's checkpoint-writer result queue now, with SIGTERM and SIGUSR1 blocked,
    in a Manager process that dies with the trainer.

    dist_checkpointing reports its writes through a Manager process that it spawns on the first
    save. A spawned process starts with default signal handlers, and Slurm delivers its stop
    signals (SIGUSR1 before the time limit, SIGTERM on preemption) to every process of a job
    step: the Manager died and the very save the signal asked for failed with BrokenPipeError
    (seen with slurm/tiny_cpu.sh). A process inherits the blocked-signal mask across exec, so the
    Manager started here never sees them; the training process handles them as before.
    The other way round, a trainer killed with SIGKILL left that Manager, and the writers Megatron
    forks for each save, running forever: both now die with the trainer (`runtime.lifetime`)."""
    import multiprocessing as mp
    import signal
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    lifetime.forked_children_die_with_this_process()
    if filesystem_async._results_queue is not None:
        return
    stop = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=lifetime.die_with_parent, initargs=(os.getpid(),))
        # the attribute Megatron's _get_write_results_queue() fills on first use
        filesystem_async._results_queue = manager.Queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
