"""The report's page and tables: `index.html` (static: no script, no server, no network; the
figures are PNG files beside it) with the metrics table and an episode viewer, and the same
table as Markdown."""

from __future__ import annotations

import random
from dataclasses import dataclass
from html import escape

from megatron_foresight.eval.report_data import Part
from megatron_foresight.inference.agent import EpisodeRecord
from megatron_foresight.rl.rewards import calibration_reward, fidelity_reward

EPISODES_SHOWN = 3
"""Episodes the viewer samples per part: enough to see the pattern, few enough to read."""

CAPTIONS = {
    "reliability": "Reliability diagram: success rate against the mean &lt;value&gt; per bin "
                   "(equal-width bins, as value_ece); bars: turns per bin.",
    "value": "&lt;value&gt; of successful and failed episodes' turns; ROC of &lt;value&gt; "
             "as a predictor of success.",
    "fidelity": "Rollout fidelity (token F1 of the predicted &lt;rollout&gt; against the "
                "observation that really came) per task set.",
}

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table.metrics { border-collapse: collapse; }
table.metrics td, table.metrics th { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.turn { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; border-top: 1px solid #ccc;
        padding: 0.5em 0; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 0.4em; margin: 0.2em 0; }
.rewards { color: #444; font-size: small; }
"""


@dataclass
class MetricsTable:
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in row) + "</tr>"
                       for row in self.rows)
        return f'<table class="metrics"><tr>{head}</tr>{body}</table>'


def metrics_table(parts: list[Part], metrics: tuple[str, ...]) -> MetricsTable:
    """One row per part: its evaluation's metrics (`-` where it has none)."""
    rows = [[p.label, p.stage or "-", str(len(p.episodes)),
             *(_number(p.metrics.get(m)) for m in metrics)] for p in parts]
    return MetricsTable(["run", "stage", "episodes", *metrics], rows)


def _number(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.3f}"


def index_html(parts: list[Part], figures: list[str], table: MetricsTable) -> str:
    figs = "".join(f'<figure><img src="{name}.png" alt="{name}">'
                   f"<figcaption>{_caption(name)}</figcaption></figure>"
                   for name in figures)
    viewer = "".join(_episodes_section(p) for p in parts if p.episodes)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>foresight report</title><style>{STYLE}</style></head><body>"
            f"<h1>foresight report</h1><h2>Metrics</h2>{table.html()}"
            f"<h2>Figures</h2>{figs}<h2>Episodes</h2>{viewer or '<p>No episodes.</p>'}"
            "</body></html>\n")


def _caption(name: str) -> str:
    if name.startswith("curves_"):
        return (f"Learning curves of {escape(name.removeprefix('curves_'))}: training as lines, "
                "validation as markers, every run on the same axes.")
    return CAPTIONS.get(name, escape(name))


def sample_episodes(records: list[EpisodeRecord], k: int = EPISODES_SHOWN
                    ) -> list[EpisodeRecord]:
    """A fixed draw of `k` episodes, a success first when there is one (the rare case at
    small scale), so two reports of the same run show the same episodes."""
    successes = [r for r in records if r.success]
    picked = successes[:1]
    rest = [r for r in records if r is not (picked[0] if picked else None)]
    picked += random.Random(0).sample(rest, min(k - len(picked), len(rest)))
    return picked


def _episodes_section(part: Part) -> str:
    episodes = "".join(_episode_html(part, r) for r in sample_episodes(part.episodes))
    return f"<h3>{escape(part.label)}</h3>{episodes}"


def _episode_html(part: Part, record: EpisodeRecord) -> str:
    outcome = "success" if record.success else "failure"
    turns = "".join(_turn_html(part, record, k) for k in range(len(record.turns)))
    return (f"<details open><summary>{escape(record.task.task_set or '')} "
            f"{escape(record.task.id)}: {outcome}, task reward {record.reward:.2f}, ended by "
            f"{escape(record.ended or '?')}, {len(record.turns)} turns</summary>"
            f"<b>prompt</b><pre>{escape(record.prompt)}</pre>{turns}</details>")


def _turn_html(part: Part, record: EpisodeRecord, k: int) -> str:
    """The turn's foresight (plan, rollout, value, action) beside what really came, with the
    per-turn rewards FC-RL would give it."""
    turn = part.fmt.parse_turn_lenient(record.turns[k].text)
    observed = record.observed(k)
    rewards = (f"calibration {calibration_reward(turn.value, record.success):.3f} · "
               f"fidelity {fidelity_reward(turn.rollout, observed):.3f} · "
               f"format {0.0 if not turn.errors else -1.0:.0f}")
    action = f"{turn.action.kind}: {turn.action.argument}" if turn.action else None
    predicted = "".join(_block(name, text) for name, text in (
        ("plan", turn.plan), ("rollout", turn.rollout),
        ("value", None if turn.value is None else f"{turn.value:.2f}"), ("action", action)))
    return (f'<div class="turn"><div><b>turn {k + 1}: foresight</b>{predicted}</div>'
            f"<div><b>what really came</b><pre>{escape(observed)}</pre>"
            f'<div class="rewards">{rewards}</div>'
            f"<details><summary>raw turn</summary><pre>{escape(record.turns[k].text)}</pre>"
            "</details></div></div>")


def _block(name: str, text: str | None) -> str:
    shown = escape(text) if text is not None else "<i>missing</i>"
    return f"<div>{name}<pre>{shown}</pre></div>"
