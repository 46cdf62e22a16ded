"""The figures of `foresight report`, each a matplotlib `Figure` built without pyplot (no global
state, no display: the Agg canvas renders them headless). Every number that judges foresight
comes from `foresight/scores.py`, so a figure says what `foresight eval` reports."""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass

from matplotlib.figure import Figure

from megatron_foresight.eval.report_data import Part
from megatron_foresight.foresight.scores import (
    auroc, brier, calibration_bins, expected_calibration_error, rollout_fidelity,
)

BINS = 10
"""Reliability bins: the equal-width bins of `value_ece` (scores.py's default)."""


def value_pairs(part: Part) -> tuple[list[float], list[bool]]:
    """Each turn's <value> and its episode's success, for the turns `score_episodes` scores
    (a readable rollout and value), so the diagram's ECE is the evaluation's."""
    values, outcomes = [], []
    for record in part.episodes:
        for turn in record.turns:
            lenient = part.fmt.parse_turn_lenient(turn.text)
            if lenient.rollout is not None and lenient.value is not None:
                values.append(lenient.value)
                outcomes.append(record.success)
    return values, outcomes


def fidelity_by_set(part: Part) -> dict[str, list[float]]:
    """Each turn's rollout fidelity (as `score_episodes` scores it), by task set."""
    out: dict[str, list[float]] = defaultdict(list)
    for record in part.episodes:
        for k, turn in enumerate(record.turns):
            lenient = part.fmt.parse_turn_lenient(turn.text)
            if lenient.rollout is not None and lenient.value is not None:
                out[record.task.task_set or "tasks"].append(
                    rollout_fidelity(lenient.rollout, record.observed(k)))
    return dict(out)


def _calibrated(parts: list[Part]) -> list[tuple[Part, list[float], list[bool]]]:
    return [(p, *pair) for p in parts if (pair := value_pairs(p))[0]]


# ----------------------------------------------------------------------------------------------
# calibration


def reliability_figure(parts: list[Part]) -> Figure:
    """Success rate against the mean <value> per bin, one series per part (legend: ECE, Brier,
    turns), over the diagonal of perfect calibration; below, the turns in each bin."""
    fig = Figure(figsize=(6, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    calibrated = _calibrated(parts)
    width = 1 / BINS / max(len(calibrated), 1)
    for i, (part, values, outcomes) in enumerate(calibrated):
        table = calibration_bins(values, outcomes, BINS)
        label = (f"{part.label}: ECE {expected_calibration_error(values, outcomes, BINS):.3f}, "
                 f"Brier {brier(values, outcomes):.3f}, n={len(values)}")
        top.plot([v for v, _, _ in table], [y for _, y, _ in table], marker="o", label=label,
                 color=f"C{i}")
        edges = [min(int(v * BINS), BINS - 1) / BINS for v, _, _ in table]
        bottom.bar([e + i * width for e in edges], [n for _, _, n in table], width=width,
                   align="edge", color=f"C{i}", label=part.label)
    top.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="success rate",
            title="Reliability of <value> (10 equal-width bins)")
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="<value> (predicted probability of success)", ylabel="turns per bin")
    return fig


def value_figure(parts: list[Part]) -> Figure:
    """Left: the <value> distribution of successful and failed episodes' turns; right: the ROC
    curve of <value> as a predictor of success, its AUROC in the legend."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    hist, roc = fig.subplots(1, 2)
    bins = [i / 20 for i in range(21)]
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    for i, (part, values, outcomes) in enumerate(_calibrated(parts)):
        for outcome, style in ((True, "-"), (False, "--")):
            picked = [v for v, y in zip(values, outcomes) if bool(y) == outcome]
            hist.hist(picked, bins=bins, histtype="step", linestyle=style, color=f"C{i}",
                      label=f"{part.label}: {'success' if outcome else 'failure'} "
                            f"({len(picked)})")
        area = auroc(values, outcomes)
        fpr, tpr = roc_points(values, outcomes)
        shown = "n/a (one outcome)" if area is None else f"{area:.3f}"
        roc.plot(fpr, tpr, color=f"C{i}", label=f"{part.label}: AUROC {shown}")
    hist.set(xlabel="<value>", ylabel="turns", title="<value> by episode outcome")
    hist.legend(fontsize="small")
    roc.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate",
            ylabel="true positive rate", title="ROC of <value> for success")
    roc.legend(loc="lower right", fontsize="small")
    return fig


def roc_points(values: list[float], outcomes: list[bool]) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) as the threshold falls through every
    distinct value; with one kind of outcome the missing rate stays 0."""
    positives = max(sum(outcomes), 1)
    negatives = max(len(outcomes) - sum(outcomes), 1)
    fpr, tpr = [0.0], [0.0]
    for threshold in sorted(set(values), reverse=True):
        above = [y for v, y in zip(values, outcomes) if v >= threshold]
        tpr.append(sum(above) / positives)
        fpr.append((len(above) - sum(above)) / negatives)
    return fpr, tpr


def fidelity_figure(parts: list[Part]) -> Figure:
    """Rollout fidelity per turn, one box per (part, task set): how well each stage predicts
    what each environment really returns."""
    fig = Figure(figsize=(max(6, 1.3 * sum(len(fidelity_by_set(p)) for p in parts)), 4.5),
                 layout="constrained")
    ax = fig.subplots()
    data, names = [], []
    for part in parts:
        for task_set, scores in sorted(fidelity_by_set(part).items()):
            data.append(scores)
            names.append(f"{part.label}\n{task_set} ({len(scores)})")
    if data:
        ax.boxplot(data, tick_labels=names, showmeans=True)
    ax.set(ylim=(-0.02, 1.02), ylabel="rollout fidelity (token F1)",
           title="Rollout fidelity per environment")
    ax.tick_params(axis="x", labelsize="small")
    return fig


# ----------------------------------------------------------------------------------------------
# learning curves


@dataclass(frozen=True)
class Panel:
    """One axes of learning curves: training keys as lines, validation keys as marked points
    (fnmatch patterns: `reward/*` draws every reward component)."""

    title: str
    train: tuple[str, ...]
    val: tuple[str, ...] = ()


FC_RL_PANELS = (
    Panel("reward components", ("reward/*",), ("val/reward/*",)),
    Panel("task success", ("reward/task",), ("val/task_success",)),
    Panel("KL to the reference", ("kl",)),
    Panel("log-prob gap, trainer vs rollout", ("logprob_gap_mean",)),
    Panel("format validity", ("rollout/format_validity",), ("val/format_validity",)),
    Panel("calibration: <value> Brier", ("rollout/value_brier",), ("val/value_brier",)),
    Panel("rollout fidelity", ("reward/fidelity",), ("val/rollout_fidelity",)),
)


def supervised_panels(parts: list[Part]) -> tuple[Panel, ...]:
    """WM-AMT / FE-SFT: the loss over all tokens, then one panel per segment type logged."""
    segments = sorted({k.removeprefix("loss/") for p in parts for r in p.curve for k in r
                       if k.startswith("loss/")})
    return (Panel("loss: all weighted tokens", ("lm_loss",), ("val/lm_loss",)),
            *(Panel(f"loss: {s}", (f"loss/{s}",), (f"val/loss/{s}",)) for s in segments))


def curve_figure(stage: str, parts: list[Part]) -> Figure | None:
    """The learning curves of one stage, every run on the same axes (None without curves)."""
    parts = [p for p in parts if p.curve]
    if not parts:
        return None
    panels = FC_RL_PANELS if stage == "fc_rl" else supervised_panels(parts)
    panels = [pl for pl in panels if _series(pl, parts)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    fig.suptitle(f"{stage}: learning curves (lines: training; markers: validation)")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, parts)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def _series(panel: Panel, parts: list[Part]) -> list[tuple[Part, str, bool]]:
    """(part, key, is_validation) of every key the panel's patterns match in a part's curve."""
    out = []
    for part in parts:
        keys = sorted({k for r in part.curve for k in r})
        for patterns, val in ((panel.train, False), (panel.val, True)):
            out += [(part, k, val) for pat in patterns for k in fnmatch.filter(keys, pat)
                    if val or not k.startswith("val/")]
    return out


def _draw_panel(ax, panel: Panel, parts: list[Part]) -> None:
    colors: dict[tuple[str, str], str] = {}
    for part, key, val in _series(panel, parts):
        points = [(r["step"], r[key]) for r in part.curve if isinstance(r.get(key), (int, float))]
        name = key.removeprefix("val/")
        color = colors.setdefault((part.label, name), f"C{len(colors) % 10}")
        label = _series_label(part, name, panel, parts) + (" (val)" if val else "")
        ax.plot([s for s, _ in points], [v for _, v in points], color=color, label=label,
                **({"marker": "D", "linestyle": "--", "markersize": 5} if val else
                   {"linewidth": 1.2}))
    ax.set(title=panel.title, xlabel="step")
    ax.legend(fontsize="x-small")


def _series_label(part: Part, key: str, panel: Panel, parts: list[Part]) -> str:
    """The run's name, and the key where one pattern draws several (reward components)."""
    several = any("*" in pat for pat in panel.train)
    suffix = key.rsplit("/", 1)[-1] if several else ""
    if len({p.label for p in parts}) == 1:
        return suffix or key
    return f"{part.label} {suffix}".strip()
