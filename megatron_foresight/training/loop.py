"""The train loop: Megatron's forward/backward schedules, Megatron DDP and optimizer, a stage
plugin for data and loss. `train()` is the whole of it:

    start processes -> run directory -> data -> model -> optimizer -> (resume) -> steps -> save

Each step: zero grads -> forward/backward over the microbatches (pipelined when PP > 1) ->
all-reduce grads across data-parallel ranks -> clip -> Adam -> LR schedule -> log -> maybe save.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from megatron_foresight.config import RecipeConfig
from megatron_foresight.data.tokenizer import build_tokenizer
from megatron_foresight.errors import UsageError
from megatron_foresight.models.provider import build_model, document_format, use_transformer_engine
from megatron_foresight.runtime.dist import (
    ParallelContext, barrier, broadcast_object, init_distributed, init_parallel_state,
    read_launch_env, shutdown,
)
from megatron_foresight.runtime import precision, run_lock
from megatron_foresight.runtime.log import MetricsWriter, WandbSettings, setup_logging
from megatron_foresight.runtime.seed import seed_all
from megatron_foresight.training import checkpoint as ckpt
from megatron_foresight.training.data import (
    StepSampler, collate, loader, packed_seq_params, to_device,
)
from megatron_foresight.training.optimizer import build_optimizer, build_scheduler
from megatron_foresight.training.plugin import (
    BuildContext, Stage, StageData, StageRuntime, load_plugin,
)
from megatron_foresight.world.build import ensure_world

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a running stage holds."""

    cfg: RecipeConfig
    ctx: ParallelContext
    run_dir: Path
    plugin: Stage
    chunks: list  # model chunks (GPTModel, or Float16Module around it)
    ddp: list  # the same chunks wrapped in Megatron DDP
    optimizer: object
    scheduler: object
    train_data: object
    valid_data: object
    fresh_modules: tuple[str, ...] = ()
    """State-dict prefixes of what the stage added to the model (not in `init_from`)."""
    step: int = 0
    stop_requested: bool = False
    nonfinite_skipped: int = 0
    """Steps skipped for a non-finite loss or gradient so far (optimizer.skip_nonfinite)."""
    packed_rows: bool = False
    """Each microbatch is one packed (THD) row of micro_batch_size x seq_length tokens
    (data.document_masks on Transformer Engine: `training.data.collate`)."""

    def runtime(self) -> StageRuntime:
        return StageRuntime(chunks=self.chunks, ctx=self.ctx, step=self.step)

    @property
    def num_microbatches(self) -> int:
        s = self.cfg.schedule
        return s.global_batch_size // (s.micro_batch_size * self.ctx.dp_size)


# --------------------------------------------------------------------------------------------
# start-up


def start_processes(cfg: RecipeConfig, verbose: bool = False) -> ParallelContext:
    """torch.distributed and Megatron's parallel state for `cfg`; resolves its
    `model.precision: auto` to fp32 or bf16, the same on every rank, before any model exists."""
    launch = read_launch_env()
    cfg.check_world_size(launch.world_size)
    if cfg.model.precision != "auto":
        use_transformer_engine(cfg)  # refuses what this machine cannot run, before any group
    setup_logging(launch.rank, verbose)
    device = init_distributed(launch, cfg.parallel.distributed_timeout_minutes)
    if precision.resolve(cfg):  # rank 0 decides (probe or cache) and tells the others
        try:
            use_transformer_engine(cfg)  # the same refusals, now for the precision chosen
        except Exception:
            shutdown()
            raise
    ctx = init_parallel_state(cfg.parallel, device)
    seed_all(cfg.seed)
    log.info("%d process(es) on %s: TP=%d PP=%d DP=%d CP=%d (%s)", ctx.world_size, device,
             ctx.tp_size, ctx.pp_size, ctx.dp_size, ctx.cp_size, launch.launcher)
    return ctx


class NonFiniteStep(UsageError):
    """A step's loss or gradient was NaN or infinite (beyond optimizer.skip_nonfinite)."""


def resolve_run_dir(cfg: RecipeConfig, run_dir: str | None, resume: bool) -> Path:
    """Rank 0 picks the run directory, holds its lock (`run_lock`) until the run ends, and
    tells the others (timestamps differ across hosts)."""
    chosen = None
    if dist.get_rank() == 0:
        try:
            path = _pick_run_dir(cfg, run_dir, resume)
            run_lock.acquire(path, "foresight train")
            saved = _saved_precision(cfg, path) if resume else None
            precision.adopt_checkpoint_precision(cfg, saved, path)
            (path / "config.yaml").write_text(
                f"# resolved recipe of stage {cfg.stage!r} ({cfg.name}); every key, defaults "
                f"included\n{_precision_note(cfg)}"
                + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            chosen = (str(path), saved)
        except UsageError as e:
            chosen = e  # every rank raises it, rather than waiting on rank 0
    chosen = broadcast_object(chosen)
    if isinstance(chosen, UsageError):
        raise chosen
    path, saved = chosen
    precision.adopt_checkpoint_precision(cfg, saved, path)
    return Path(path)


def _saved_precision(cfg: RecipeConfig, path: Path) -> str | None:
    """The model.precision the run's newest checkpoint was saved in, when this recipe's was
    auto (so a resume keeps it); None if there is none or it cannot be read (loading it will
    say why)."""
    if cfg.model.precision_choice is None:
        return None
    found = next(iter(ckpt.resume_candidates(path)), None)
    if found is None:
        return None
    try:
        return ckpt.read_common(found).get("config", {}).get("model", {}).get("precision")
    except (UsageError, AttributeError):  # a damaged checkpoint; a config that is not a dict
        return None


def _precision_note(cfg: RecipeConfig) -> str:
    choice = cfg.model.precision_choice
    return "" if choice is None else f"# {choice.note()}\n"


def _pick_run_dir(cfg: RecipeConfig, run_dir: str | None, resume: bool) -> Path:
    root = Path(cfg.logging.runs_root)
    if run_dir is None and resume:
        candidates = sorted((p for p in root.glob(f"{cfg.logging.run_name or cfg.name}*")
                             if ckpt.find_checkpoint(p)), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return root / (cfg.logging.run_name or f"{cfg.name}-{stamp}")
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--run-dir {path} is a file, not a directory; choose another path")
    if not resume and ckpt.find_checkpoint(path):
        raise UsageError(f"run directory {path} already has checkpoints; pass --resume to "
                         "continue it, or choose another --run-dir")
    return path


def recipe_tokenizer(cfg: RecipeConfig):
    """The tokenizer of a recipe (`RecipeConfig`). The built-in world's tokenizer is built with
    the world, on first use, where data.world says (every rank calls this)."""
    tok = cfg.data.tokenizer_config()
    if tok.type == "sentencepiece" and not cfg.data.tokenizer.path:
        ensure_world(cfg.data.world, cfg.seed)
    return build_tokenizer(tok)


def cache_dir(cfg: RecipeConfig) -> Path:
    """Where derived data (tokenized datasets, corpus indices) is cached: data.cache_dir."""
    return Path(cfg.data.cache_dir or Path(cfg.logging.runs_root) / "cache")


def build_run(cfg: RecipeConfig, ctx: ParallelContext, run_dir: Path) -> Run:
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )

    plugin = load_plugin(cfg.stage)(cfg)
    tokenizer = recipe_tokenizer(cfg)
    s = cfg.schedule
    documents = None if plugin.on_policy else document_format(cfg)  # on-policy: no packing
    build = BuildContext(
        cfg=cfg, stage_cfg=cfg.stage_config, tokenizer=tokenizer,
        num_train_samples=s.train_steps * s.global_batch_size,
        num_valid_samples=s.eval_steps * s.global_batch_size if s.eval_steps else 0,
        cache_dir=cache_dir(cfg), progress=ctx.is_logging_rank, documents=documents)
    if plugin.on_policy:  # it makes its samples while training
        plugin.setup(build)
        data = StageData(train=[])
    else:
        data = plugin.build_data(build)
    chunks = build_model(cfg, cfg.padded_vocab_size(tokenizer.vocab_size), ctx.pg_collection)
    fresh = plugin.extend_model(chunks, ctx)  # modules a stage adds (PPO's value head)
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    ddp = [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
           for i, c in enumerate(chunks)]
    optimizer = build_optimizer(cfg, ddp)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [d.no_sync for d in ddp] if len(ddp) > 1 else ddp[0].no_sync
    return Run(cfg=cfg, ctx=ctx, run_dir=run_dir, plugin=plugin, chunks=chunks, ddp=ddp,
               optimizer=optimizer, scheduler=build_scheduler(cfg, optimizer),
               train_data=data.train, valid_data=data.valid, fresh_modules=fresh,
               packed_rows=documents == "starts")


def _resume(run: Run) -> bool:
    """Load the newest intact checkpoint of the run; a damaged one (files that differ from its
    manifest) is moved aside to `step_N.damaged` and the one before it is tried."""
    candidates = ckpt.resume_candidates(run.run_dir)
    for found in candidates:
        try:
            common = ckpt.load_checkpoint(
                found, chunks=run.chunks, ctx=run.ctx, optimizer=run.optimizer,
                scheduler=run.scheduler, optimizer_sharding=run.cfg.checkpoint.optimizer_sharding,
                distributed_optimizer=run.cfg.parallel.use_distributed_optimizer,
                precision=run.cfg.model.precision)
        except ckpt.CheckpointDamaged as e:
            aside = found.with_name(found.name + ".damaged")
            if run.ctx.rank == 0:
                found.rename(aside)
                log.warning("%s; moved it aside to %s and resuming from the checkpoint before "
                            "it", e, aside.name)
            barrier()
            continue
        run.step = common["progress"]["step"]
        run.nonfinite_skipped = common["progress"].get("nonfinite_skipped", 0)
        log.info("resumed from %s at step %d", found, run.step)
        return True
    if candidates:
        raise ckpt.CheckpointError(
            f"no intact checkpoint in {run.run_dir}: every one was damaged and moved aside "
            "(step_N.damaged). Start a new run directory, from another run's weights with "
            "checkpoint.init_from if you have one")
    return False


def restore(run: Run, resume: bool) -> None:
    """Continue from the run's latest intact checkpoint (--resume), or start from another
    run's weights (checkpoint.init_from), or start fresh."""
    if resume and _resume(run):
        return
    if resume:
        log.info("no checkpoint in %s yet: starting from step 0", run.run_dir)
    init_from = run.cfg.checkpoint.init_from
    if init_from:
        source = ckpt.find_checkpoint(init_from)
        if source is None:
            raise UsageError(f"checkpoint.init_from={init_from}: no complete checkpoint there")
        fresh = run.fresh_modules
        ckpt.load_checkpoint(source, chunks=run.chunks, ctx=run.ctx, fresh=fresh)
        # With bf16/fp16 weights the optimizer steps fp32 copies of them, made when it was
        # built: copy the loaded weights in, or the first step writes the initial ones back.
        run.optimizer.reload_model_params()
        log.info("initialized model weights from %s%s", source,
                 f" ({', '.join(fresh)} newly initialized)" if fresh else "")


# --------------------------------------------------------------------------------------------
# steps


def _forward_step(plugin, with_predictions, data_iterator, model):
    batch = next(data_iterator)
    # data.document_masks: a [b, 1, s, s] mask (local layers) or packed-sequence boundaries
    # (Transformer Engine, which then needs no mask)
    mask, packed = batch.get("attention_mask"), packed_seq_params(batch)
    # TE reads a mask given with THD boundaries as a padding mask: never both
    assert mask is None or packed is None, "a batch with both a mask and THD boundaries"
    thd = {} if packed is None else {"packed_seq_params": packed}
    if not with_predictions:
        output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"],
                       **thd)
        return output, partial(plugin.loss, batch)
    # Evaluation of a plugin that scores predictions: the full logits (gathered over TP) give
    # both the loss and the argmax; the output of a non-last pipeline stage passes through.
    output = model(batch["tokens"], batch["position_ids"], mask, runtime_gather_output=True,
                   **thd)
    return output, partial(_loss_with_predictions, plugin, batch)


def _loss_with_predictions(plugin, batch, logits_BSV):
    per_token_BS = torch.nn.functional.cross_entropy(
        logits_BSV.float().flatten(0, 1), batch["labels"].flatten(), reduction="none"
    ).view_as(batch["labels"])
    return plugin.loss({**batch, "predicted": logits_BSV.argmax(-1)}, per_token_BS)


def _iterators(run: Run, dataset, start_step: int, num_steps: int | None):
    s = run.cfg.schedule
    make = lambda: loader(dataset, StepSampler(len(dataset), s.global_batch_size,  # noqa: E731
                                               s.micro_batch_size, run.ctx.dp_rank,
                                               run.ctx.dp_size, start_step, num_steps),
                          run.cfg.data.num_workers)
    # With an interleaved pipeline each model chunk reads the same microbatches itself.
    return [make() for _ in run.ddp] if len(run.ddp) > 1 else make()


def _run_schedule(run: Run, iterators, forward_only: bool) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with_predictions = forward_only and run.plugin.eval_predictions
    seq, micro = run.cfg.data.seq_length, run.cfg.schedule.micro_batch_size
    if run.packed_rows:  # the shapes pipeline stages send each other: [seq, micro, hidden]
        seq, micro = seq * micro, 1
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, run.plugin, with_predictions),
        data_iterator=iterators,
        model=run.ddp if len(run.ddp) > 1 else run.ddp[0],
        num_microbatches=run.num_microbatches, seq_length=seq, micro_batch_size=micro,
        forward_only=forward_only)


def _reduce_metrics(run: Run, outputs: list[dict]) -> dict[str, float]:
    """Sum the plugin's (sum, count) pairs over microbatches and data-parallel ranks."""
    if not run.ctx.is_last_stage or not outputs:
        return {}
    names = sorted(outputs[0])
    totals = torch.stack([sum(o[n].float() for o in outputs) for n in names])
    dist.all_reduce(totals, group=run.ctx.dp_group)
    # A metric with nothing to count (a segment type absent from the data) is left out.
    return {n: (t[0] / t[1]).item() for n, t in zip(names, totals) if t[1] > 0}


def _finite_everywhere(run: Run, metrics: dict[str, float]) -> bool:
    """Whether the step's losses (on the last pipeline stage) and gradients (every rank's
    buffers) are finite on all ranks: one all-reduce of a flag, and a pass over the gradients
    as cheap as the norm the optimizer computes anyway. fp16 is left to Megatron's loss scaler,
    for which an overflow is an expected event that skips the step and lowers the scale."""
    ok = all(math.isfinite(v) for v in metrics.values())
    if ok and run.cfg.model.precision != "fp16":
        ok = all(bool(torch.isfinite(b.grad_data).all())
                 for d in run.ddp for b in d.buffers + d.expert_parallel_buffers)
    flag = torch.tensor([1.0 if ok else 0.0],
                        device="cuda" if run.ctx.device == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _skip_nonfinite(run: Run, metrics: dict[str, float]) -> dict[str, float]:
    """Stop the run, naming the step, or (optimizer.skip_nonfinite) skip the update."""
    run.nonfinite_skipped += 1
    bad = ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v))
    what = f"non-finite {bad}" if bad else "non-finite gradients (the loss was finite)"
    allowed = run.cfg.optimizer.skip_nonfinite
    if run.nonfinite_skipped > allowed:
        raise NonFiniteStep(
            f"step {run.step + 1}: {what}; the run stopped before saving anything of it, and the "
            f"checkpoints in {run.run_dir / 'checkpoints'} are intact. Lower optimizer.lr, check "
            "the data, or let the run skip such steps with optimizer.skip_nonfinite=N"
            + (f" (it is {allowed}, all used)" if allowed else ""))
    log.warning("step %d: %s: update skipped (%d of optimizer.skip_nonfinite=%d)",
                run.step + 1, what, run.nonfinite_skipped, allowed)
    for chunk in run.ddp:
        chunk.zero_grad_buffer()
    return {**metrics, "skipped": 1, "lr": run.optimizer.param_groups[0]["lr"]}


def train_step(run: Run, iterators) -> dict[str, float]:
    for chunk in run.ddp:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    outputs = _run_schedule(run, iterators, forward_only=False)
    metrics = _reduce_metrics(run, outputs)
    if not _finite_everywhere(run, metrics):
        return _skip_nonfinite(run, metrics)
    updated, grad_norm, _ = run.optimizer.step()
    if updated:
        run.scheduler.step(increment=1)
    metrics["lr"] = run.optimizer.param_groups[0]["lr"]
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if not updated:
        metrics["skipped"] = 1
    return metrics


def on_policy_step(run: Run) -> dict[str, float]:
    """One step of an on-policy stage (FC-RL): the plugin plays episodes with the current
    model and turns them into samples (`collect`); then `epochs` passes of optimizer steps over
    them, `global_batch_size` samples per step (this rank's share of it per rank)."""
    s = run.cfg.schedule
    started = time.perf_counter()
    samples, metrics = run.plugin.collect(run.runtime())
    per_update = s.global_batch_size // run.ctx.dp_size
    if not samples or len(samples) % per_update:
        raise UsageError(f"each rank made {len(samples)} samples this step, which is not a "
                         f"multiple of the samples per optimizer step and rank ({per_update} = "
                         f"schedule.global_batch_size / data-parallel size); change one of them")
    collected = time.perf_counter()
    rng = torch.Generator().manual_seed(run.cfg.seed * 1_000_003 + run.step)
    totals: dict[str, list[float]] = {}
    device = next(run.chunks[0].parameters()).device
    for _ in range(run.plugin.epochs):
        order = torch.randperm(len(samples), generator=rng).tolist()
        for u in range(0, len(samples), per_update):
            chosen = [samples[i] for i in order[u:u + per_update]]
            micro = s.micro_batch_size
            update = train_step(run, iter([to_device(collate(chosen[j:j + micro]), device)
                                           for j in range(0, per_update, micro)]))
            for k, v in update.items():
                totals.setdefault(k, []).append(v)
    # per optimizer step figures averaged over the step's updates; lr is the last one
    metrics.update({k: (v[-1] if k == "lr" else sum(v) / len(v)) for k, v in totals.items()})
    metrics["updates"] = len(totals.get("lr", []))
    metrics["time/train_s"] = time.perf_counter() - collected
    metrics["step_time_s"] = time.perf_counter() - started
    return metrics


def evaluate(run: Run) -> dict[str, float]:
    if run.plugin.on_policy:  # it validates by playing episodes
        return run.plugin.validate(run.runtime())
    s = run.cfg.schedule
    if run.valid_data is None or s.eval_steps == 0:
        return {}
    for chunk in run.ddp:
        chunk.eval()
    iterators = _iterators(run, run.valid_data, 0, s.eval_steps)
    totals: list[dict] = []
    with torch.no_grad():
        for _ in range(s.eval_steps):
            totals += _run_schedule(run, iterators, forward_only=True)
    for chunk in run.ddp:
        chunk.train()
    return {f"val/{k}": v for k, v in _reduce_metrics(run, totals).items()}


def save(run: Run, finite: bool = True) -> Path:
    c = run.cfg.checkpoint
    path = ckpt.save_checkpoint(
        run.run_dir / "checkpoints", run.step, chunks=run.chunks, optimizer=run.optimizer,
        scheduler=run.scheduler, ctx=run.ctx,
        consumed_samples=run.step * run.cfg.schedule.global_batch_size,
        config=run.cfg.to_dict(), keep_last=c.keep_last, save_optimizer=c.save_optimizer,
        optimizer_sharding=c.optimizer_sharding, finite=finite,
        nonfinite_skipped=run.nonfinite_skipped)
    log.info("saved checkpoint %s", path)
    return path


# --------------------------------------------------------------------------------------------
# the loop


def _install_stop_signals(run: Run) -> None:
    """SIGTERM (preemption, scancel) and SIGUSR1 (Slurm's warning before the time limit) make
    the loop save a checkpoint after the current step and exit cleanly."""
    def request_stop(signum, _frame):
        run.stop_requested = True
        log.warning("received %s: will save and stop after this step", signal.Signals(signum).name)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, request_stop)
    ckpt.start_writer_immune_to_stop_signals()


def _any_rank_stopping(run: Run) -> bool:
    flag = torch.tensor([1.0 if run.stop_requested else 0.0])
    if run.ctx.device == "cuda":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _report(run: Run, bar, metrics: dict) -> None:
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in metrics.items())
    line = f"step {run.step}/{run.cfg.schedule.train_steps} {shown}"
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def loop(run: Run, writer: MetricsWriter | None, stop_at_step: int | None = None) -> None:
    s, c = run.cfg.schedule, run.cfg.checkpoint
    tokens_per_step = s.global_batch_size * run.cfg.data.seq_length
    logging_rank = run.ctx.is_logging_rank
    bar = tqdm(total=s.train_steps, initial=run.step, desc=f"{run.cfg.stage} training", unit="step",
               disable=not (logging_rank and run.cfg.logging.progress_bar and sys.stderr.isatty()),
               dynamic_ncols=True)
    bar = None if bar.disable else bar
    on_policy = run.plugin.on_policy
    iterators = None if on_policy else _iterators(run, run.train_data, run.step,
                                                  s.train_steps - run.step)
    if s.eval_at_start and run.step == 0:
        metrics = evaluate(run)
        if logging_rank and metrics:
            writer.write(0, metrics)
            _report(run, bar, metrics)
    while run.step < s.train_steps:
        started = time.perf_counter()
        metrics = on_policy_step(run) if on_policy else train_step(run, iterators)
        run.step += 1
        skipped = metrics.get("skipped", 0) > 0 and run.cfg.model.precision != "fp16"
        if run.nonfinite_skipped:
            metrics["nonfinite_skipped"] = run.nonfinite_skipped
        if not on_policy:  # an on-policy step times itself (generation, log-probs, training)
            elapsed = time.perf_counter() - started
            metrics["tokens_per_s"] = tokens_per_step / elapsed
            metrics["step_time_s"] = elapsed
        if s.eval_interval and run.step % s.eval_interval == 0 and run.step < s.train_steps:
            metrics.update(evaluate(run))
        if run.step == s.train_steps:
            metrics.update(evaluate(run))
        if logging_rank:
            if run.step % run.cfg.logging.log_interval == 0 or run.step == s.train_steps:
                writer.write(run.step, metrics)
                _report(run, bar, metrics)
            if bar is not None:
                shown = metrics.get("lm_loss", metrics.get("reward/total", float("nan")))
                bar.set_postfix(loss=f"{shown:.4f}", refresh=False)
                bar.update(1)
        stopping = _any_rank_stopping(run) or run.step == stop_at_step
        if (c.save_interval and run.step % c.save_interval == 0) or stopping \
                or run.step == s.train_steps:
            save(run, finite=not skipped)
        if stopping:
            log.warning("stopped at step %d of %d on request; continue with --resume", run.step,
                        s.train_steps)
            break
    if bar is not None:
        bar.close()


def train(cfg: RecipeConfig, run_dir: str | None = None, resume: bool = False,
          verbose: bool = False, stop_at_step: int | None = None) -> Path:
    """Run one stage to completion, or until a stop signal or `stop_at_step` (then save, so
    --resume continues exactly); returns the run directory."""
    ctx = start_processes(cfg, verbose)
    try:
        path = resolve_run_dir(cfg, run_dir, resume)
        log.info("run directory: %s", path)
        run = build_run(cfg, ctx, path)
        restore(run, resume)
        if run.step >= cfg.schedule.train_steps:
            log.info("already trained to step %d of %d: nothing to do", run.step,
                     cfg.schedule.train_steps)
            return path
        _install_stop_signals(run)
        writer = MetricsWriter(path, cfg.logging.tensorboard, run.step,
                               WandbSettings.of(cfg.logging)) if ctx.is_logging_rank else None
        try:
            loop(run, writer, stop_at_step)
        finally:
            if writer is not None:
                writer.close()
        barrier()
        if ctx.rank == 0:
            print(f"run directory: {path}", flush=True)
        return path
    finally:
        run_lock.release_all()
        shutdown()
