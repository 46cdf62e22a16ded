"""Scores of an agent's episodes (what `foresight eval` reports after FE-SFT and FC-RL):

    task_success          share of episodes whose answer the environment accepted
    format_validity       share of agent turns that parse strictly (foresight block required)
    rollout_fidelity      mean token F1 of each turn's <rollout> (lenient reading) against the
                          observation that really followed (its content; for the turn that ended
                          the episode, `format.final_observation`)
    rollout_names_gold    share of search turns whose rollout names a gold document's title
    value_brier / value_log_score / value_ece / value_ece_mass / value_auroc
                          each turn's <value> (lenient) against the episode's final success
    turns_with_foresight  share of agent turns with a readable rollout and value

and per task set (`<set>/<metric>`), the same plus the environment's own scores (search: `em`
and `f1` of the answers; math and others: `accuracy`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from megatron_foresight.tasks import Task
from megatron_foresight.foresight.format import AgentTurn
from megatron_foresight.foresight.formats import FORMATS, ForesightFormat
from megatron_foresight.foresight.scores import (
    auroc, brier, expected_calibration_error, log_score, names_gold_document, rollout_fidelity,
)
from megatron_foresight.inference.agent import EpisodeRecord

METRICS = ("task_success", "format_validity", "rollout_fidelity", "rollout_names_gold",
           "value_brier", "value_log_score", "value_ece", "value_ece_mass", "value_auroc",
           "turns_with_foresight", "turns_per_episode")


def _gold_titles(task: Task) -> list[str]:
    """Titles of the documents a task's answer is found in, where its file says (the built-in
    world's `meta.hops`)."""
    return [h["entity"] for h in (task.meta or {}).get("hops", []) if "entity" in h]


def score_episodes(records: Sequence[EpisodeRecord], fmt: ForesightFormat = FORMATS["v1"]
                   ) -> dict[str, float | None]:
    """The metrics above of episodes whose turns are written in the foresight format `fmt`."""
    if not records:
        raise ValueError("no episodes to score")
    valid = fidelity = gold_hits = gold_turns = turns = with_foresight = 0
    values, outcomes = [], []
    for record in records:
        for k, turn in enumerate(record.turns):
            turns += 1
            valid += isinstance(fmt.parse_turn(turn.text), AgentTurn)
            lenient = fmt.parse_turn_lenient(turn.text)
            if lenient.rollout is None or lenient.value is None:
                continue
            with_foresight += 1
            fidelity += rollout_fidelity(lenient.rollout, record.observed(k))
            values.append(lenient.value)
            outcomes.append(record.success)
            gold = _gold_titles(record.task)
            if gold and turn.observation is not None:
                gold_turns += 1
                gold_hits += names_gold_document(lenient.rollout, gold)
    out = {"task_success": sum(r.success for r in records) / len(records),
           "format_validity": valid / turns if turns else 0.0,
           "rollout_fidelity": fidelity / with_foresight if with_foresight else None,
           "rollout_names_gold": gold_hits / gold_turns if gold_turns else None,
           "turns_with_foresight": with_foresight / turns if turns else 0.0,
           "turns_per_episode": turns / len(records)}
    calibrated = bool(values)
    out["value_brier"] = brier(values, outcomes) if calibrated else None
    out["value_log_score"] = log_score(values, outcomes) if calibrated else None
    out["value_ece"] = expected_calibration_error(values, outcomes) if calibrated else None
    out["value_ece_mass"] = (expected_calibration_error(values, outcomes, strategy="mass")
                             if calibrated else None)
    out["value_auroc"] = auroc(values, outcomes) if calibrated else None
    return out


def scores_by_set(records: Sequence[EpisodeRecord], task_sets,
                  fmt: ForesightFormat = FORMATS["v1"]) -> dict[str, float | None]:
    """`<set>/<metric>` for each task set that played: `score_episodes` of its episodes and its
    environment's own metrics (`EnvSpec.metrics`)."""
    by_set: dict[str, list] = defaultdict(list)
    for r in records:
        by_set[r.task.task_set].append(r)
    out = {}
    for name, played in by_set.items():
        own = task_sets.by_name[name].spec.metrics(played)
        out.update({f"{name}/{k}": v for k, v in {**score_episodes(played, fmt), **own}.items()})
    return out


def format_table(rows: dict[str, dict], metrics: Sequence[str] = METRICS) -> str:
    """Metrics as rows, one column per evaluated model (a dash where a metric has no value)."""
    names = list(rows)
    width = max(len(m) for m in metrics) + 2
    col = max(12, *(len(n) + 2 for n in names))
    lines = ["".ljust(width) + "".join(n.rjust(col) for n in names)]
    for m in metrics:
        cells = [rows[n].get(m) for n in names]
        lines.append(m.ljust(width) + "".join(
            ("-" if v is None else f"{v:.3f}").rjust(col) for v in cells))
    return "\n".join(lines)
