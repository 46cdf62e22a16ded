"""The three-stage pipeline: WM-AMT -> FE-SFT -> FC-RL, each stage starting from the previous
stage's checkpoint, each evaluated by playing the validation tasks; a table of every stage,
`report.json` (one object per stage, keyed by metric name) and `foresight report`'s figures and
page (`report/index.html`) in the run directory. With `logging.wandb_project` set, each stage is
one W&B run named after it, in a group named after the run directory.

Re-running with the same run directory continues: finished stages are skipped (their
checkpoint is complete), a stage cut short resumes from its latest checkpoint, and evaluations
already written are read back."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from megatron_foresight.config import load_recipe
from megatron_foresight.errors import UsageError
from megatron_foresight.training.plugin import load_plugin

log = logging.getLogger(__name__)

STAGES = ("wm_amt", "fe_sft", "fc_rl")
REPORT_METRICS = ("task_success", "format_validity", "value_brier", "value_ece", "value_auroc",
                  "rollout_fidelity")


def stage_recipes(recipe_dir: Path) -> list[tuple[str, Path]]:
    found = [(s, recipe_dir / f"{s}.yaml") for s in STAGES]
    missing = [str(p) for _, p in found if not p.is_file()]
    if missing:
        raise UsageError(f"{recipe_dir}: the pipeline needs a recipe per stage "
                         f"({', '.join(f'{s}.yaml' for s in STAGES)}); missing: "
                         f"{', '.join(missing)}")
    return found


_STAGE_PREFIX = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):(?!//)")


def for_stage(overrides, stage: str, tasks: int = 1) -> list[str]:
    """The overrides of one stage: what the stage asks of a pipeline (`pipeline_overrides`;
    FC-RL leaves out its own validation, which the pipeline's evaluations play, unless they
    play none: --tasks 0), then those of its section (`fc_rl.group_size=2`), of the shared
    sections (`data.world=DIR`) and those addressed to it (`fe_sft:schedule.train_steps=150`);
    another stage's are left out."""
    mine = []
    for o in overrides:
        addressed = _STAGE_PREFIX.match(o)
        if addressed:
            if addressed.group(1) not in STAGES:
                raise UsageError(f"{o}: {addressed.group(1)!r} is not a stage; STAGE:key=value "
                                 f"addresses one of {', '.join(STAGES)} (format-free SFT runs "
                                 "FE-SFT's recipe, plain-reward RL FC-RL's)")
            if addressed.group(1) == stage:
                mine.append(o[addressed.end():])
        elif o.split(".", 1)[0] not in STAGES or o.split(".", 1)[0] == stage:
            mine.append(o)
    return [*(load_plugin(stage).pipeline_overrides() if tasks else []), *mine]


class Stopped(Exception):
    """A stage stopped on request (a stop signal: preemption, Slurm's time-limit warning)
    before its last step, its checkpoint saved: the command ends there, and running it again
    continues from that checkpoint."""


def trained_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint of a run directory (0 without one)."""
    from megatron_foresight.training.checkpoint import find_checkpoint

    found = find_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    return int(found.name.removeprefix("step_")) if found is not None else 0


def train_to_end(cfg, run_dir: Path) -> None:
    """Train (or resume) a stage to its last step; `Stopped` if it stopped before, so that
    nothing is evaluated or started from a half-trained stage."""
    from megatron_foresight.training.loop import train

    train(cfg, run_dir=str(run_dir), resume=True)
    step = trained_step(run_dir)
    if step < cfg.schedule.train_steps:
        raise Stopped(f"{run_dir} stopped at step {step} of {cfg.schedule.train_steps}; run the "
                      "same command again to continue")


def read_evaluation(out: Path, run_dir: Path, tasks: int) -> dict | None:
    """The metrics of an evaluation already written for `run_dir`, or None when there is none
    to trust: missing, unreadable, of another number of tasks, or older than the run's newest
    checkpoint (the run was trained further since)."""
    from megatron_foresight.training.checkpoint import find_checkpoint

    try:
        doc = json.loads(out.read_text())
        metrics = doc["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ckpt = find_checkpoint(run_dir)
    if doc.get("tasks", tasks) != tasks or (
            ckpt is not None and ckpt.stat().st_mtime > out.stat().st_mtime):
        log.info("%s is stale (other --tasks, or an older checkpoint): evaluating again", out)
        return None
    return metrics


def _wandb_names(cfg, run_dir: Path, stage: str) -> list[str]:
    """A pipeline's stages as one W&B group, each run named after its stage (unless the
    recipe or an override names them)."""
    if not cfg.logging.wandb_project:
        return []
    return [*([f"logging.wandb_group={run_dir.resolve().name}"]
              if cfg.logging.wandb_group is None else []),
            *([f"logging.wandb_run_name={stage}"] if cfg.logging.wandb_run_name is None else [])]


def _stage_overrides(path: Path, stage: str, overrides, tasks: int, run_dir: Path) -> list[str]:
    """A stage's overrides, with its W&B names (which read the recipe they apply to)."""
    mine = for_stage(overrides, stage, tasks)
    return [*mine, *_wandb_names(load_recipe(path, mine), run_dir, stage)]


def run_pipeline(recipe_dir: str | Path, run_dir: str | Path, tasks: int = 32,
                 overrides: list[str] = ()) -> Path:
    """Train and evaluate every stage; returns the path of report.json. `overrides` apply to
    every stage's recipe (e.g. data.world=...), or, when they name a stage's section
    (fc_rl.group_size=2), to that stage's."""
    from megatron_foresight.eval.agent_eval import format_table
    from megatron_foresight.eval.report import write_report
    from megatron_foresight.eval.run import EvalOptions, evaluate_checkpoint
    from megatron_foresight.runtime.dist import read_launch_env

    recipe_dir, run_dir = Path(recipe_dir), Path(run_dir)
    recipes = stage_recipes(recipe_dir)
    # every recipe is checked before the first stage trains
    stage_overrides = {s: _stage_overrides(p, s, overrides, tasks, run_dir) for s, p in recipes}
    configs = [load_recipe(p, stage_overrides[s]) for s, p in recipes]
    rank0 = read_launch_env().rank == 0
    report, previous = {}, None
    for (stage, path), cfg in zip(recipes, configs):
        stage_dir = run_dir / stage
        if previous is not None:
            cfg = load_recipe(path, [*stage_overrides[stage],
                                     f"checkpoint.init_from={previous}"])
        log.info("stage %s: %s -> %s", stage, path, stage_dir)
        train_to_end(cfg, stage_dir)
        out = run_dir / f"eval_{stage}.json"
        metrics = read_evaluation(out, stage_dir, tasks)
        if metrics is None:
            # one report of every stage, below, instead of one per evaluation
            metrics = evaluate_checkpoint(cfg, EvalOptions(ckpt=str(stage_dir), tasks=tasks),
                                          str(out), report=False)
        report[stage] = {m: metrics.get(m) for m in REPORT_METRICS}
        previous = stage_dir
    path = run_dir / "report.json"
    if rank0:
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(format_table(report, REPORT_METRICS))
        print(f"report: {path}")
        print(f"figures: {write_report([run_dir], run_dir / 'report').index}")
    return path
