"""`foresight eval`: a checkpoint judged by its stage's validation metrics (per-segment losses,
next-observation accuracy for WM-AMT; for FC-RL, its rewards on the episodes played below) and
by playing tasks of the recipe's task sets (or of a one-off file) with greedy generation: task
success, format validity, rollout fidelity and value calibration, over all tasks and per set
(with each environment's own scores: EM and F1 for search, accuracy for math)."""

from __future__ import annotations

import json
import os
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_foresight.config import RecipeConfig, TaskSetConfig
from megatron_foresight.configtree import ConfigError
from megatron_foresight.tasksets import TaskSets
from megatron_foresight.errors import UsageError
from megatron_foresight.eval.agent_eval import score_episodes, scores_by_set
from megatron_foresight.eval.report import write_report
from megatron_foresight.inference.agent import run_episodes
from megatron_foresight.inference.generate import Generator, Sampling
from megatron_foresight.runtime.dist import shutdown
from megatron_foresight.training import checkpoint as ckpt
from megatron_foresight.training.loop import (
    build_run, cache_dir, evaluate, recipe_tokenizer, start_processes,
)

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    ckpt: str | None
    """A run directory or checkpoint; None evaluates the recipe's initial weights."""
    tasks: int = 64
    """Tasks to play, taken from the task sets in turn; 0 skips the agent evaluation."""
    split: str = "validation"
    max_new_tokens: int = 320
    batch_size: int = 16
    """Episodes generated together (KV-cache slots with the continuous rollout)."""
    temperature: float = 0.0
    rollout: str = "continuous"
    """`continuous` or `rounds`: how episodes share the decode batch (FC-RL's `rollout`)."""
    task_sets: list[str] = field(default_factory=list)
    """Play only these of the recipe's task sets (names); empty: all."""
    tasks_file: str | None = None
    """Play this file instead of the recipe's task sets (with `env`, and `corpus` for search)."""
    env: str | None = None
    corpus: str | None = None


def one_off_task_set(path: str, env: str | None, split: str, corpus: str | None
                     ) -> TaskSetConfig:
    """`--tasks-file F --env NAME [--corpus C]` as a task set named after the file."""
    if env is None:
        raise UsageError("--tasks-file needs --env: the environment that plays the tasks "
                         "(search, math, or one a recipe's extensions registers)")
    name = Path(Path(path).name.removesuffix(".gz")).stem
    try:
        task_set = TaskSetConfig(env=env, name=name, splits={split: path},
                                 options={"corpus": corpus} if corpus else {})
        task_set.resolve(None)
    except ConfigError as e:
        if e.key.startswith("options.") and "unknown key" in e.message:
            raise UsageError(f"--corpus goes with --env search; {env} takes no corpus") from None
        flag = {"env": "--env", "options.corpus": "--corpus"}.get(e.key, e.key)
        raise UsageError(f"{flag}: {e.message}") from None
    return task_set


def task_sets_for(cfg: RecipeConfig, opts: EvalOptions) -> TaskSets:
    """The task sets the evaluation plays, their files checked (before any process starts)."""
    if opts.corpus and not opts.tasks_file:
        raise UsageError("--corpus goes with --tasks-file (a recipe's search sets name their "
                         "corpus in their options)")
    if opts.tasks_file:
        sets = TaskSets([one_off_task_set(opts.tasks_file, opts.env, opts.split, opts.corpus)],
                        cfg.data.world, cfg.seed)
    else:
        sets = TaskSets.of(cfg, opts.task_sets)
    sets.with_split(opts.split)
    sets.check_files(opts.split)
    return sets


def _load(run, path: str | None) -> None:
    if path is None:
        log.info("no checkpoint given: evaluating the recipe's initial weights")
        return
    # a stage's own modules (PPO's value head) play no part in evaluation: not read
    log.info("evaluating %s", load_weights(run.chunks, run.ctx, path, run.fresh_modules))


def policy_path(cfg: RecipeConfig, given: str | None, required: bool = False) -> str | None:
    """The checkpoint a command plays (`eval`, `data collect`): --ckpt, else the recipe's
    checkpoint.init_from (e.g. `convert from-hf`'s output); None when neither names one (eval
    then plays the initial weights), a one-line error with `required`."""
    path = given or cfg.checkpoint.init_from or None
    if path is None and required:
        raise UsageError("--ckpt: give the policy to play (a run directory or checkpoint, e.g. "
                         "the output of `foresight convert from-hf`)")
    return path


def find_weights(path: str) -> Path:
    """The complete checkpoint `path` names (a run directory or a checkpoint)."""
    found = ckpt.find_checkpoint(path)
    if found is None:
        raise UsageError(f"--ckpt {path}: no complete checkpoint there")
    return found


def load_weights(chunks: list, ctx, path: str, fresh: tuple[str, ...] = ()) -> Path:
    """The model weights of the checkpoint `path` names (a run directory or a checkpoint) into
    `chunks`, except the modules under the prefixes `fresh`; returns the checkpoint read."""
    found = find_weights(path)
    ckpt.load_checkpoint(found, chunks=chunks, ctx=ctx, fresh=fresh)
    return found


def play(run, cfg: RecipeConfig, tokenizer, task_sets: TaskSets, opts: EvalOptions):
    """Greedy (or `opts.temperature`) episodes of `opts.tasks` tasks of `opts.split`."""
    task_sets.prepare(cache_dir(cfg), progress=run.ctx.is_logging_rank)
    model = run.chunks[0]
    model.eval()
    generator = Generator(model, tokenizer, max_sequence_length=cfg.data.seq_length,
                          pad_id=tokenizer.eod)
    sampling = Sampling(temperature=opts.temperature, max_new_tokens=opts.max_new_tokens,
                        seed=cfg.seed)
    return run_episodes(generator, task_sets.tasks(opts.split, opts.tasks), task_sets.make_env,
                        sampling, batch_size=opts.batch_size, progress=run.ctx.is_logging_rank,
                        fmt=cfg.format, continuous=opts.rollout == "continuous",
                        row_streams=True)


def evaluate_checkpoint(cfg: RecipeConfig, opts: EvalOptions, out: str | None = None,
                        task_sets: TaskSets | None = None, report: bool = True) -> dict:
    """Every metric of the checkpoint; written as JSON to `out` (with the episodes beside it,
    as `<out>.episodes.jsonl`, and with `report`, `foresight report`'s figures and page in
    `<out without .json>.report/`) when given."""
    if opts.tasks and task_sets is None:
        task_sets = task_sets_for(cfg, opts)
    ctx = start_processes(cfg)
    try:
        if out and ctx.is_logging_rank:  # before playing: a bad path fails now, not after
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        run = build_run(cfg, ctx, Path(out).parent if out else Path("."))
        _load(run, opts.ckpt)
        # An on-policy stage validates by playing episodes; the agent evaluation below plays
        # them once (its metrics are task_success, format_validity, ...) and the stage scores
        # its rewards on those (val/reward/..., or SPLIT/reward/... for another split).
        plays = opts.tasks and run.plugin.on_policy
        metrics = {} if plays else evaluate(run)
        if opts.tasks:
            tokenizer = recipe_tokenizer(cfg)
            with torch.no_grad():
                records = play(run, cfg, tokenizer, task_sets, opts)
            metrics.update(score_episodes(records, cfg.format))
            metrics.update(scores_by_set(records, task_sets, cfg.format))
            if plays:
                metrics.update(run.plugin.reward_metrics(
                    records, "val" if opts.split == "validation" else opts.split))
            if out and ctx.is_logging_rank:
                _write_episodes(records, Path(str(out) + ".episodes.jsonl"))
        if out and ctx.is_logging_rank:
            # whole or not at all: a pipeline or experiment reads an existing file as done
            tmp = Path(str(out) + ".tmp")
            tmp.write_text(json.dumps(
                {"checkpoint": opts.ckpt, "stage": cfg.stage, "split": opts.split,
                 "format": cfg.format.name,
                 "task_sets": [s.name for s in task_sets.sets] if opts.tasks else [],
                 "tasks": opts.tasks, "metrics": metrics}, indent=1) + "\n")
            os.replace(tmp, out)
            if report:
                write_report([out], Path(out).with_suffix(".report"))
        return metrics
    finally:
        shutdown()


def _write_episodes(records, path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"task_id": r.task.id, "task_set": r.task.task_set,
                                "prompt": r.prompt, "success": r.success,
                                "reward": r.reward, "ended": r.ended,
                                "turns": [{"agent": t.text, "env": t.observation, "stop": t.stop}
                                          for t in r.turns]}, ensure_ascii=False) + "\n")
