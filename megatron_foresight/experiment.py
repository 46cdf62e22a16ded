"""The paper's ablation as one resumable command: rows of stage chains over several seeds,
each row's final model evaluated on the same validation tasks, and a table of the mean and 95%
confidence interval of every metric per row, with the paper's orderings tested on paired
per-seed differences.

Rows (`ROWS`; `--rows` picks some), each a chain of steps from the base model:

    sft                   format-free SFT: the FE-SFT recipe on the same trajectories without
                          foresight (`foresight:X` sources read as X, foresight_format: none)
    fe_sft                FE-SFT
    wm_amt+sft            WM-AMT, then format-free SFT
    wm_amt+fe_sft         WM-AMT, then FE-SFT
    wm_amt+fe_sft+rl      ... then RL with plain rewards: the FC-RL recipe keeping only the
                          terms of whole turns or episodes (task, format), not the foresight's
    wm_amt+fe_sft+fc_rl   ... then FC-RL

The base is the WM-AMT recipe's `checkpoint.init_from` (null: fresh weights from the seed).
Runs are shared by path: `seed<S>/<chain prefix>` is trained once per seed and reused by every
row that starts with it (one WM-AMT per seed; the FE-SFT after it is reused by both RL rows).
One world serves every seed. `runs.jsonl` records each training and evaluation this command
performed (how shared runs are counted); `experiment.json` and `experiment.md` hold the table
(each task set's success is a column of its own, as the paper's figures are search only).

Re-running with the same --run-dir continues: a run trained to its last step is not started
again, a run cut short resumes from its checkpoint, evaluations already written are read."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_foresight.config import load_recipe
from megatron_foresight.errors import UsageError
from megatron_foresight.pipeline import (
    _STAGE_PREFIX, REPORT_METRICS, _wandb_names, for_stage, read_evaluation, stage_recipes,
    train_to_end, trained_step,
)

log = logging.getLogger(__name__)

STEPS = {"wm_amt": "wm_amt", "sft": "fe_sft", "fe_sft": "fe_sft", "rl": "fc_rl",
         "fc_rl": "fc_rl"}
"""Each kind of step and the stage (recipe) it runs."""

STEP_ONLY = ("sft", "rl")
"""The steps that run another stage's recipe, so that `sft:key=value` (or `rl:`) can reach
them alone: format-free SFT at its own budget (`sft:schedule.train_steps=325`: as many
trajectories as FE-SFT's 600 steps see in the tiny recipes, not as many tokens; README)."""


@dataclass(frozen=True)
class Row:
    key: str
    """Its chain of steps joined by '+', as --rows names it."""
    label: str

    @property
    def chain(self) -> tuple[str, ...]:
        return tuple(self.key.split("+"))


ROWS = (Row("sft", "SFT"), Row("fe_sft", "FE-SFT"), Row("wm_amt+sft", "WM-AMT + SFT"),
        Row("wm_amt+fe_sft", "WM-AMT + FE-SFT"), Row("wm_amt+fe_sft+rl", "WM-AMT + FE-SFT + RL"),
        Row("wm_amt+fe_sft+fc_rl", "WM-AMT + FE-SFT + FC-RL"))
ROW_BY_KEY = {r.key: r for r in ROWS}

ORDERINGS = (
    ("wm_amt+fe_sft", "fe_sft", "greater", "WM-AMT + FE-SFT > FE-SFT"),
    ("wm_amt+fe_sft+fc_rl", "wm_amt+fe_sft+rl", "greater", "FC-RL > plain-reward RL"),
    ("fe_sft", "sft", "not_greater", "FE-SFT alone no better than SFT alone"),
)
"""The paper's claims as (row a, row b, relation of a to b, statement), tested on task success
and, where both rows have them, on fidelity (higher is better) and Brier (lower is better)."""

HIGHER_IS_BETTER = {"task_success": True, "format_validity": True, "rollout_fidelity": True,
                    "value_brier": False, "value_ece": False, "value_auroc": True}

SET_SUCCESS = "/task_success"
"""The suffix of an evaluation's success on one task set (`search/task_success`): the paper's
figures are search only, so each set's success is a column (and a tested metric) of its own."""


def row_metrics(metrics: dict) -> dict:
    """What the table keeps of one evaluation: the report's metrics, then each task set's
    success (in the evaluation's order)."""
    return {**{m: metrics.get(m) for m in REPORT_METRICS},
            **{k: v for k, v in metrics.items() if k.endswith(SET_SUCCESS)}}


def _set_metrics(per_seed: dict[int, dict[str, dict]]) -> list[str]:
    """The per-set success keys any row of any seed has, first seen first."""
    found = {}
    for rows in per_seed.values():
        for metrics in rows.values():
            found.update((k, None) for k in metrics if k.endswith(SET_SUCCESS))
    return list(found)


def _higher_is_better(metric: str) -> bool:
    return True if metric.endswith(SET_SUCCESS) else HIGHER_IS_BETTER[metric]


# two-sided 95% quantiles of Student's t by degrees of freedom (1..30)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher to second order: within 1e-4 beyond 30 degrees of freedom
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(values: Sequence[float | None]) -> dict:
    """Mean, standard deviation and the 95% t interval of the defined values (None: the metric
    was undefined for that seed, e.g. AUROC when every task failed); n counts the defined."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if not n:
        return {"n": 0, "mean": None, "sd": None, "low": None, "high": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "low": None, "high": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def parse_rows(text: str | None) -> list[Row]:
    if not text:
        return list(ROWS)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROW_BY_KEY]
    if unknown:
        raise UsageError(f"--rows: unknown row(s) {', '.join(unknown)}; the rows are "
                         f"{', '.join(ROW_BY_KEY)}")
    return [ROW_BY_KEY[k] for k in dict.fromkeys(keys)]


def step_overrides(kind: str, cfg) -> list[str]:
    """What turns a stage's recipe (loaded as `cfg`) into the step `kind`: format-free SFT
    reads FE-SFT's `foresight:X` sources as X and plays without foresight; plain-reward RL
    keeps the reward terms credited to whole turns or episodes."""
    if kind == "sft":
        st = cfg.stage_config

        def plain(sources):
            return list(dict.fromkeys(s.removeprefix("foresight:") for s in sources))

        sources = plain(st.sources)
        weights = None
        if st.weights is not None:
            merged: dict[str, float] = {}
            for s, w in zip(st.sources, st.weights):
                key = s.removeprefix("foresight:")
                merged[key] = merged.get(key, 0.0) + w
            weights = [merged[s] for s in sources]
        out = ["foresight_format=none", f"fe_sft.sources={json.dumps(sources)}",
               f"fe_sft.weights={json.dumps(weights)}"]
        if st.valid_sources is not None:
            out.append(f"fe_sft.valid_sources={json.dumps(plain(st.valid_sources))}")
        if st.segment_weights is not None:
            kept = {k: v for k, v in st.segment_weights.items()
                    if k not in ("plan", "rollout", "value", "keyword")}
            out.append(f"fe_sft.segment_weights={json.dumps(kept)}")
        return out
    if kind == "rl":
        kept = {k: v for k, v in cfg.stage_config.reward_weights.items() if _plain_term(k)}
        if not kept:
            raise UsageError("plain-reward RL keeps the reward terms of whole turns or episodes "
                             "(task, format); the FC-RL recipe weighs none")
        return [f"fc_rl.reward_weights={json.dumps(kept)}"]
    return []


def _plain_term(term: str) -> bool:
    """Whether a reward term is plain RL's: credited to whole turns or episodes (task, format),
    not to the foresight's parts."""
    from megatron_foresight.rl.rewards import REWARD_TERMS

    return REWARD_TERMS[term].credit in ("episode", "turn")


def _check_step(kind: str, cfg, addressed: Sequence[str]) -> None:
    """What makes a step the row it stands for must survive the overrides addressed to it:
    format-free SFT writes no foresight, plain-reward RL weighs no foresight term."""
    wrong = None
    if kind == "sft" and cfg.foresight_format != "none":
        wrong = f"foresight_format: {cfg.foresight_format} (format-free SFT writes none)"
    if kind == "rl":
        foresight = [k for k, w in cfg.stage_config.reward_weights.items()
                     if w and not _plain_term(k)]
        if foresight:
            wrong = (f"fc_rl.reward_weights weighs {', '.join(foresight)} (plain-reward RL "
                     "keeps the terms of whole turns or episodes)")
    if wrong:
        raise UsageError(f"{' '.join(f'{kind}:{o}' for o in addressed)}: the {kind} step would "
                         f"no longer be its row: {wrong}")


def split_step_only(overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The overrides of the stages (`for_stage` reads them), and by step kind those addressed
    to one step alone (`sft:key=value`, `rl:key=value`, prefix removed)."""
    stages, step_only = [], {kind: [] for kind in STEP_ONLY}
    for o in overrides:
        addressed = _STAGE_PREFIX.match(o)  # as `for_stage` reads a prefix (not `http://`)
        if addressed and addressed.group(1) in STEP_ONLY:
            step_only[addressed.group(1)].append(o[addressed.end():])
        else:
            stages.append(o)
    return stages, step_only


class Experiment:
    def __init__(self, recipe_dir, run_dir, seeds: Sequence[int], rows: Sequence[Row],
                 tasks: int, overrides: Sequence[str] = ()):
        if not seeds:
            raise UsageError("--seeds: at least one seed")
        if tasks < 1:
            raise UsageError("--tasks: each row's evaluation plays at least 1 task")
        self.recipe_dir, self.run_dir = Path(recipe_dir), Path(run_dir)
        self.seeds, self.rows, self.tasks = list(seeds), list(rows), tasks
        self.overrides, self.step_only = split_step_only(overrides)
        seeded = [o for o in overrides if o.split("=", 1)[0].rsplit(":", 1)[-1] == "seed"]
        if seeded:
            raise UsageError(f"{seeded[0]}: the experiment sets each run's seed itself (the "
                             "recipe's seed and the ones after it, --seeds of them); leave "
                             "seed= out")
        self.recipes = dict(stage_recipes(self.recipe_dir))
        self.ledger = self.run_dir / "runs.jsonl"

    def config(self, seed: int, chain: tuple[str, ...]):
        """The recipe of the last step of `chain` for `seed`, started from the run before it
        (or from the base)."""
        kind = chain[-1]
        stage = STEPS[kind]
        path = self.recipes[stage]
        mine = [*for_stage(self.overrides, stage, self.tasks), f"seed={seed}"]
        base = load_recipe(path, mine)
        mine += step_overrides(kind, base) + self.step_only.get(kind, [])
        if len(chain) > 1:
            mine.append(f"checkpoint.init_from={json.dumps(str(self.run_path(seed, chain[:-1])))}")
        elif stage != "wm_amt":
            # the base every row starts from: the WM-AMT recipe's own starting point
            start = load_recipe(self.recipes["wm_amt"], [
                *for_stage(self.overrides, "wm_amt", self.tasks), f"seed={seed}"])
            mine.append(f"checkpoint.init_from={json.dumps(start.checkpoint.init_from)}")
        cfg = load_recipe(path, mine)
        _check_step(kind, cfg, self.step_only.get(kind, []))
        group = self.run_dir.resolve().parent / f"{self.run_dir.resolve().name}-seed{seed}"
        names = _wandb_names(cfg, group, "+".join(chain))
        return load_recipe(path, mine + names) if names else cfg

    def run_path(self, seed: int, chain: tuple[str, ...]) -> Path:
        return self.run_dir / f"seed{seed}" / "+".join(chain)

    def _record(self, entry: dict) -> None:
        from megatron_foresight.runtime.dist import read_launch_env

        if read_launch_env().rank == 0:
            with self.ledger.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def ensure_trained(self, seed: int, chain: tuple[str, ...], done: set) -> Path:
        path = self.run_path(seed, chain)
        if (seed, chain) in done:
            return path
        if len(chain) > 1:
            self.ensure_trained(seed, chain[:-1], done)
        cfg = self.config(seed, chain)
        before = trained_step(path)
        if before < cfg.schedule.train_steps:
            log.info("experiment: training %s (%s) from step %d", path, chain[-1], before)
            start = time.monotonic()
            try:
                train_to_end(cfg, path)
            finally:  # a stopped or failed training is recorded too, with the step it reached
                self._record({"train": f"seed{seed}/{'+'.join(chain)}", "kind": chain[-1],
                              "seed": seed, "from_step": before, "to_step": trained_step(path),
                              "time_s": round(time.monotonic() - start, 1)})
        done.add((seed, chain))
        return path

    def evaluate(self, seed: int, row: Row) -> dict:
        from megatron_foresight.eval.run import EvalOptions, evaluate_checkpoint

        out = self.run_dir / f"seed{seed}" / f"eval_{row.key}.json"
        metrics = read_evaluation(out, self.run_path(seed, row.chain), self.tasks)
        if metrics is not None:
            return metrics
        start = time.monotonic()
        metrics = evaluate_checkpoint(
            self.config(seed, row.chain),
            EvalOptions(ckpt=str(self.run_path(seed, row.chain)), tasks=self.tasks),
            str(out), report=False)
        self._record({"eval": f"seed{seed}/{row.key}", "seed": seed,
                      "time_s": round(time.monotonic() - start, 1)})
        return metrics

    def check(self) -> dict:
        """Every step's recipe, loaded before anything trains (a bad override fails now, not
        after an hour), and the same validation tasks for every row; returns them by chain
        (for the first seed)."""
        seed = self.seeds[0]
        chains = {row.chain[:i] for row in self.rows for i in range(1, len(row.chain) + 1)}
        configs = {chain: self.config(seed, chain) for chain in sorted(chains)}
        played = {row.key: configs[row.chain].tasks for row in self.rows}
        first = next(iter(played.values()))
        differ = [k for k, t in played.items() if t != first]
        if differ:
            raise UsageError(f"rows {', '.join(played)} must play the same validation tasks, "
                             f"but the recipes of {', '.join(differ)} list other task sets than "
                             f"{self.rows[0].key}'s; give the stage recipes one tasks: list")
        return configs

    def check_unchanged(self, configs: dict) -> None:
        """The runs already in --run-dir were trained from the recipes this call resolves: a
        step's resolved recipe (every key but the seed, the run it starts from and W&B names)
        is kept in `recipes.json` when first seen, and a later call that resolves it otherwise
        while its run exists is refused, naming the keys, rather than mixing two recipes in one
        table. Adding seeds or rows is fine, and so is a key the code gained since, at its
        default (`_added_at_default`). `configs`: `check()`'s."""
        from megatron_foresight.runtime.dist import read_launch_env

        path = self.run_dir / "recipes.json"
        try:
            kept = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError) as e:
            raise UsageError(f"{path} is unreadable ({e}): it records the recipes of the runs "
                             "in this directory; restore it or use a new --run-dir") from None
        now = {"+".join(c): _recipe_keys(cfg, base=len(c) == 1) for c, cfg in configs.items()}
        defaults: dict = {}
        for chain, cfg in configs.items():
            step, keys = "+".join(chain), now["+".join(chain)]
            before = kept.get(step)
            if before is None or before == keys or \
                    not any((self.run_dir / f"seed{s}" / step).exists() for s in self.seeds):
                continue
            if cfg.stage not in defaults:
                defaults[cfg.stage] = _stage_defaults(cfg.stage)
            changed = sorted(k for k in before.keys() | keys.keys()
                             if before.get(k) != keys.get(k)
                             and not _added_at_default(k, before, keys, defaults[cfg.stage]))
            if not changed:
                continue
            shown = "; ".join(f"{k}: {json.dumps(before.get(k))} then, {json.dumps(keys.get(k))} "
                              f"now" for k in changed[:4])
            raise UsageError(f"{self.run_dir}: the runs of step {step} were trained from another "
                             f"recipe ({shown}{'; ...' if len(changed) > 4 else ''}). Use a new "
                             "--run-dir for the new recipe, or put the recipe and overrides "
                             "back to continue this experiment")
        if read_launch_env().rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({**kept, **now}, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)

    def run(self) -> dict:
        from megatron_foresight.runtime.dist import read_launch_env
        from megatron_foresight.world.build import ensure_world

        first = load_recipe(self.recipes["wm_amt"], for_stage(self.overrides, "wm_amt"))
        self.check_unchanged(self.check())
        if first.data.world:  # one world for every seed: the recipe's, built with its seed
            ensure_world(first.data.world, first.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        done: set = set()
        per_seed: dict[int, dict[str, dict]] = {}
        for seed in self.seeds:  # seed by seed: a partial run already has whole seeds
            for row in self.rows:
                self.ensure_trained(seed, row.chain, done)
                metrics = self.evaluate(seed, row)
                per_seed.setdefault(seed, {})[row.key] = row_metrics(metrics)
        summary = summarize(per_seed, self.rows)
        summary["tasks"] = self.tasks
        summary["wall_time_s_this_call"] = round(time.monotonic() - started, 1)
        if read_launch_env().rank == 0:
            (self.run_dir / "experiment.json").write_text(json.dumps(summary, indent=1) + "\n")
            text = format_summary(summary)
            (self.run_dir / "experiment.md").write_text(text + "\n")
            print(text)
            try:
                print(f"figure: {plot_summary(summary, self.run_dir / 'experiment.png')}")
            except ImportError as e:  # matplotlib is a dependency; say so if it is missing
                log.warning("no figure (%s)", e)
            print(f"table: {self.run_dir / 'experiment.md'}")
        return summary


_PER_RUN_KEYS = ("seed", "logging.wandb_group", "logging.wandb_run_name")


def _stage_defaults(stage: str) -> dict:
    """The default of every field of the recipe's config classes, by flat `section.key` (the
    stage's section under its name; the default algorithm's fields for `fc_rl.algorithm`).
    Only dataclass fields are keys here: a free-form mapping such as `fc_rl.reward_weights` is
    one value, so an entry added to it is never taken for a key the code gained. Built
    without the stage's recipe checks (they ask for what only a recipe gives); a stage whose
    config cannot be built bare gives none."""
    from megatron_foresight.config import RecipeConfig
    from megatron_foresight.configtree import to_dict
    from megatron_foresight.training.plugin import load_plugin

    out: dict = {}

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = json.loads(json.dumps(to_dict(value), default=str))

    try:
        walk(RecipeConfig(stage=stage), "")
        walk(load_plugin(stage).Config(), f"{stage}.")
    except (TypeError, ValueError) as e:  # a plugin config with required fields, say
        log.info("experiment: no defaults of stage %s (%s): every added key is a change",
                 stage, e)
        return {}
    return out


def _added_at_default(key: str, before: dict, now: dict, defaults: dict) -> bool:
    """A key the recorded recipe lacks (the code gained it since the runs were trained) that
    this call resolves to its default: not a change of recipe, since a key is added with the
    default that keeps what the code did before. A key set otherwise, by the recipe, a preset
    or an override, is a change; so is anything inside a list (`tasks:`) or a free-form
    mapping, and a field of an algorithm other than the default one."""
    return key not in before and key in now and key in defaults and now[key] == defaults[key]


def _recipe_keys(cfg, base: bool) -> dict:
    """A resolved recipe as flat `section.key` -> JSON value, less what differs between the
    runs of one step (`_PER_RUN_KEYS`; `checkpoint.init_from` too unless the step starts from
    the base model: otherwise it is the run before it, by path)."""
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    walk(json.loads(json.dumps(cfg.to_dict(), default=str)), "")
    return {k: v for k, v in flat.items()
            if k not in _PER_RUN_KEYS and (base or k != "checkpoint.init_from")}


def summarize(per_seed: dict[int, dict[str, dict]], rows: Sequence[Row]) -> dict:
    seeds = sorted(per_seed)
    sets = _set_metrics(per_seed)
    table = {}
    for row in rows:
        table[row.key] = {"label": row.label, **{
            m: mean_interval([per_seed[s][row.key].get(m) for s in seeds])
            for m in (*REPORT_METRICS, *sets)}}
    keys = {r.key for r in rows}
    orderings = []
    for a, b, relation, statement in ORDERINGS:
        if a not in keys or b not in keys:
            continue
        tests = {}
        for metric in ("task_success", *sets, "rollout_fidelity", "value_brier"):
            diffs = [per_seed[s][a][metric] - per_seed[s][b][metric] for s in seeds
                     if per_seed[s][a].get(metric) is not None
                     and per_seed[s][b].get(metric) is not None]
            if not diffs:
                continue
            d = mean_interval(diffs)
            tests[metric] = {**d, "verdict": _verdict(d, relation, _higher_is_better(metric))}
        orderings.append({"claim": statement, "a": a, "b": b, "relation": relation,
                          "tests": tests})
    return {"seeds": seeds, "per_seed": {str(s): per_seed[s] for s in seeds},
            "rows": table, "task_sets": sets, "orderings": orderings}


def _verdict(d: dict, relation: str, higher_better: bool) -> str:
    """Whether the paired difference a - b supports the claim, at 95%."""
    if d["low"] is None:
        return "one seed: no interval"
    better = d["low"] > 0 if higher_better else d["high"] < 0
    worse = d["high"] < 0 if higher_better else d["low"] > 0
    if relation == "greater":
        return "holds" if better else ("reversed" if worse else "not resolved (interval spans 0)")
    # "not_greater": a is no better than b
    if better:
        return "does not hold (a is better)"
    return "holds (a is worse)" if worse else "consistent (interval spans 0: no difference shown)"


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    if stat["low"] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def _metric_table(summary: dict, metrics: Sequence[str]) -> list[str]:
    """A Markdown table of each row's mean [interval] of `metrics`, with the count of seeds
    where a metric was defined when it is not all of them."""
    lines = ["| row | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for stats in summary["rows"].values():
        lines.append(f"| {stats['label']} | " + " | ".join(
            _cell(stats[m]) + ("" if stats[m]["n"] in (0, len(summary["seeds"]))
                               else f" (n={stats[m]['n']})")
            for m in metrics) + " |")
    return lines


def format_summary(summary: dict) -> str:
    """The table as Markdown: mean [95% interval] per row and metric, then the orderings."""
    lines = [f"seeds: {', '.join(map(str, summary['seeds']))}; {summary.get('tasks', '?')} "
             "validation tasks per evaluation; mean [95% t interval] over seeds "
             "(n < seeds where a metric was undefined)", "",
             *_metric_table(summary, REPORT_METRICS)]
    if summary.get("task_sets"):
        lines += ["", "Success by task set:", "", *_metric_table(summary, summary["task_sets"])]
    if summary["orderings"]:
        lines += ["", "| claim (paired over seeds) | metric | a - b | verdict |",
                  "|---|---|---|---|"]
        for o in summary["orderings"]:
            for metric, t in o["tests"].items():
                lines.append(f"| {o['claim']} | {metric} | {_cell(t)} | {t['verdict']} |")
        lines += ["", "Each verdict is one 95% interval of its own, with no correction for the "
                  "number of them."]
    if any(key.split("+")[-1] == "sft" for key in summary["rows"]):
        lines += ["", "Format validity of the format-free rows (SFT) counts turns of a "
                  "well-formed action, with or without think; the foresight rows' count turns "
                  "of the whole foresight format. Fidelity and the value's scores exist only "
                  "for rows with foresight."]
    return "\n".join(lines)


def plot_summary(summary: dict, out: Path) -> Path:
    """Bars of each row's mean with its 95% interval, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(summary["rows"].values())
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, metric in zip(axes.flat, REPORT_METRICS):
        means = [r[metric]["mean"] for r in rows]
        xs = [i for i, m in enumerate(means) if m is not None]
        heights = [means[i] for i in xs]
        err = [[means[i] - (rows[i][metric]["low"] if rows[i][metric]["low"] is not None
                            else means[i]) for i in xs],
               [(rows[i][metric]["high"] if rows[i][metric]["high"] is not None else means[i])
                - means[i] for i in xs]]
        ax.bar(xs, heights, yerr=err, capsize=4, color="#4c72b0")
        for i, m in enumerate(means):
            if m is None:  # undefined for every seed (e.g. no foresight, or no success)
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8, color="gray")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["label"] for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_title(metric)
    fig.suptitle(f"seeds {', '.join(map(str, summary['seeds']))}: mean and 95% interval")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
