"""`foresight eval`: a checkpoint judged by its stage's validation metrics (per-segment losses,
next-observation accuracy for WM-AMT; for FC-RL, its rewards on the episodes played below) and,
on a built world, by playing validation tasks with greedy generation: task success, format
validity, rollout fidelity and value calibration."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_foresight.config import RecipeConfig
from megatron_foresight.errors import UsageError
from megatron_foresight.eval.agent_eval import WorldEnvs, score_episodes
from megatron_foresight.inference.agent import run_episodes
from megatron_foresight.inference.generate import Generator, Sampling
from megatron_foresight.runtime.dist import shutdown
from megatron_foresight.training import checkpoint as ckpt
from megatron_foresight.training.loop import build_run, evaluate, start_processes
from megatron_foresight.training.plugin import fresh_modules

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    ckpt: str | None
    """A run directory or checkpoint; None evaluates the recipe's initial weights."""
    tasks: int = 64
    """Validation tasks to play (half search, half math); 0 skips the agent evaluation."""
    split: str = "validation"
    max_new_tokens: int = 320
    batch_size: int = 16
    temperature: float = 0.0


def _load(run, path: str | None) -> None:
    if path is None:
        log.info("no checkpoint given: evaluating the recipe's initial weights")
        return
    found = ckpt.find_checkpoint(path)
    if found is None:
        raise UsageError(f"--ckpt {path}: no complete checkpoint there")
    # a stage's own modules (PPO's value head) play no part in evaluation: not read
    ckpt.load_checkpoint(found, chunks=run.chunks, ctx=run.ctx,
                         fresh=fresh_modules(run.plugin))
    log.info("evaluating %s", found)


def agent_metrics(run, cfg: RecipeConfig, tokenizer, opts: EvalOptions) -> dict:
    if not cfg.data.world:
        raise UsageError("the agent evaluation plays the built-in world's tasks: set data.world "
                         "(or pass --tasks 0 for the stage metrics only)")
    envs = WorldEnvs(Path(cfg.data.world))
    model = run.chunks[0]
    model.eval()
    generator = Generator(model, tokenizer, max_sequence_length=cfg.data.seq_length,
                          pad_id=tokenizer.eod)
    sampling = Sampling(temperature=opts.temperature, max_new_tokens=opts.max_new_tokens,
                        seed=cfg.seed)
    records = run_episodes(generator, envs.tasks(opts.split, opts.tasks), envs.make_env,
                           sampling, batch_size=opts.batch_size,
                           progress=run.ctx.is_logging_rank)
    return score_episodes(records), records


def evaluate_checkpoint(cfg: RecipeConfig, opts: EvalOptions, out: str | None = None) -> dict:
    """Every metric of the checkpoint; written as JSON to `out` (with the episodes beside it,
    as `<out>.episodes.jsonl`) when given."""
    from megatron_foresight.data.tokenizer import build_tokenizer

    ctx = start_processes(cfg)
    try:
        run = build_run(cfg, ctx, Path(out).parent if out else Path("."))
        _load(run, opts.ckpt)
        # An on-policy stage validates by playing episodes; the agent evaluation below plays
        # them once (its metrics are task_success, format_validity, ...) and the stage scores
        # its rewards on those (val/reward/..., or SPLIT/reward/... for another split).
        plays = opts.tasks and hasattr(run.plugin, "reward_metrics")
        metrics = {} if plays else evaluate(run)
        if opts.tasks:
            tokenizer = build_tokenizer(cfg.data.tokenizer_config())
            with torch.no_grad():
                scores, records = agent_metrics(run, cfg, tokenizer, opts)
            metrics.update(scores)
            if plays:
                metrics.update(run.plugin.reward_metrics(
                    records, "val" if opts.split == "validation" else opts.split))
            if out and ctx.is_logging_rank:
                _write_episodes(records, Path(str(out) + ".episodes.jsonl"))
        if out and ctx.is_logging_rank:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps({"checkpoint": opts.ckpt, "stage": cfg.stage,
                                             "metrics": metrics}, indent=1) + "\n")
        return metrics
    finally:
        shutdown()


def _write_episodes(records, path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"task_id": r.task.id, "success": r.success, "ended": r.ended,
                                "turns": [{"agent": t.text, "env": t.observation, "stop": t.stop}
                                          for t in r.turns]}, ensure_ascii=False) + "\n")
