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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_foresight.data.tasks import Task, read_corpus, read_tasks
from megatron_foresight.envs.math import MathEnv
from megatron_foresight.envs.retriever import BM25Retriever
from megatron_foresight.envs.search import SearchEnv
from megatron_foresight.errors import UsageError
from megatron_foresight.foresight.format import AgentTurn, parse_turn, parse_turn_lenient
from megatron_foresight.foresight.scores import (
    auroc, brier, expected_calibration_error, log_score, names_gold_document, rollout_fidelity,
)
from megatron_foresight.inference.agent import EpisodeRecord

METRICS = ("task_success", "format_validity", "rollout_fidelity", "rollout_names_gold",
           "value_brier", "value_log_score", "value_ece", "value_ece_mass", "value_auroc",
           "turns_with_foresight", "turns_per_episode")


@dataclass
class WorldEnvs:
    """The environments of a built world, configured as its trajectories were played."""

    world: Path

    def __post_init__(self):
        manifest = self.world / "manifest.json"
        if not manifest.is_file():
            raise UsageError(f"{self.world} is not a built world (no manifest.json); build one "
                             "with `foresight data build-world --out DIR`")
        self.sizes = json.loads(manifest.read_text())["sizes"]
        self._retriever = None

    def tasks(self, split: str, n: int) -> list[Task]:
        """Up to n tasks of the split, alternating search and math."""
        by_type = [list(read_tasks(self.world / "tasks" / f"{kind}-{split}.jsonl"))
                   for kind in ("search", "math")]
        mixed = [t for pair in zip(*by_type) for t in pair]
        return mixed[:n]

    def make_env(self, task: Task):
        if task.type == "math":
            return MathEnv(self.sizes["math_max_turns"])
        if self._retriever is None:
            self._retriever = BM25Retriever(list(read_corpus(self.world / "corpus.jsonl")))
        return SearchEnv(self._retriever, self.sizes["top_k"], self.sizes["search_max_turns"])


def _gold_titles(task: Task) -> list[str]:
    return [h["entity"] for h in (task.meta or {}).get("hops", []) if "entity" in h]


def score_episodes(records: Sequence[EpisodeRecord]) -> dict[str, float | None]:
    if not records:
        raise ValueError("no episodes to score")
    valid = fidelity = gold_hits = gold_turns = turns = with_foresight = 0
    values, outcomes = [], []
    for record in records:
        for k, turn in enumerate(record.turns):
            turns += 1
            valid += isinstance(parse_turn(turn.text), AgentTurn)
            lenient = parse_turn_lenient(turn.text)
            if lenient.rollout is None or lenient.value is None:
                continue
            with_foresight += 1
            fidelity += rollout_fidelity(lenient.rollout, record.observed(k))
            values.append(lenient.value)
            outcomes.append(record.success)
            if record.task.type == "search" and turn.observation is not None:
                gold_turns += 1
                gold_hits += names_gold_document(lenient.rollout, _gold_titles(record.task))
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
