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


def for_stage(overrides, stage: str, tasks: int = 1) -> list[str]:
    """The overrides of one stage: what the stage asks of a pipeline (`pipeline_overrides`;
    FC-RL leaves out its own validation, which the pipeline's evaluations play, unless they
    play none: --tasks 0), then those of its section (`fc_rl.group_size=2`), of the shared
    sections (`data.world=DIR`) and those addressed to it (`fe_sft:schedule.train_steps=150`);
    another stage's are left out."""
    mine = []
    for o in overrides:
        target, colon, rest = o.partition(":")
        if colon and target in STAGES and "=" not in target:
            if target == stage:
                mine.append(rest)
        elif o.split(".", 1)[0] not in STAGES or o.split(".", 1)[0] == stage:
            mine.append(o)
    return [*(load_plugin(stage).pipeline_overrides() if tasks else []), *mine]


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
    from megatron_foresight.training.loop import train

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
        train(cfg, run_dir=str(stage_dir), resume=True)
        out = run_dir / f"eval_{stage}.json"
        if out.is_file():
            metrics = json.loads(out.read_text())["metrics"]
        else:
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
