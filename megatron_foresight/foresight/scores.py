"""Scores of foresight: calibration of the value against outcomes, fidelity of the predicted
rollout against the observation that came back, and format validity. Pure functions of plain
lists, used by rewards, evaluation and tests alike."""

from __future__ import annotations

import math
from typing import Sequence

from megatron_foresight.answers import normalize_answer, token_f1
from megatron_foresight.foresight.format import AgentTurn, parse_turn


def _pairs(values: Sequence[float], outcomes: Sequence[bool]) -> list[tuple[float, float]]:
    if len(values) != len(outcomes):
        raise ValueError(f"{len(values)} values but {len(outcomes)} outcomes")
    if not values:
        raise ValueError("no values to score")
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"values are probabilities in [0, 1], got {v}")
    return [(float(v), float(bool(y))) for v, y in zip(values, outcomes)]


def brier(values: Sequence[float], outcomes: Sequence[bool]) -> float:
    """Mean squared error of the value as a probability of success (0 is perfect)."""
    pairs = _pairs(values, outcomes)
    return sum((v - y) ** 2 for v, y in pairs) / len(pairs)


def log_score(values: Sequence[float], outcomes: Sequence[bool], eps: float = 1e-6) -> float:
    """Mean log-likelihood of the outcomes under the values (0 is perfect; values are clipped
    to [eps, 1 - eps] so a confident miss costs log(eps), not infinity)."""
    pairs = _pairs(values, outcomes)
    total = 0.0
    for v, y in pairs:
        v = min(max(v, eps), 1 - eps)
        total += math.log(v) if y else math.log(1 - v)
    return total / len(pairs)


def calibration_bins(values: Sequence[float], outcomes: Sequence[bool], bins: int = 10,
                     strategy: str = "width") -> list[tuple[float, float, int]]:
    """(mean value, success rate, count) per non-empty bin: `width` bins split [0, 1] evenly,
    `mass` bins hold equal numbers of values (sorted)."""
    pairs = _pairs(values, outcomes)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if strategy == "width":
        groups: list[list] = [[] for _ in range(bins)]
        for v, y in pairs:
            groups[min(int(v * bins), bins - 1)].append((v, y))
    elif strategy == "mass":
        ordered = sorted(pairs)
        groups = [ordered[len(ordered) * i // bins:len(ordered) * (i + 1) // bins]
                  for i in range(bins)]
    else:
        raise ValueError(f"strategy must be 'width' or 'mass', got {strategy!r}")
    return [(sum(v for v, _ in g) / len(g), sum(y for _, y in g) / len(g), len(g))
            for g in groups if g]


def expected_calibration_error(values: Sequence[float], outcomes: Sequence[bool],
                               bins: int = 10, strategy: str = "width") -> float:
    """Count-weighted mean |mean value - success rate| over the bins."""
    table = calibration_bins(values, outcomes, bins, strategy)
    total = sum(n for _, _, n in table)
    return sum(n * abs(v - y) for v, y, n in table) / total


def auroc(values: Sequence[float], outcomes: Sequence[bool]) -> float | None:
    """Probability that a random success gets a higher value than a random failure (ties count
    half); None when only one kind of outcome is present."""
    pairs = _pairs(values, outcomes)
    ranked = sorted(pairs)
    ranks = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1  # tied values share their mean rank
        i = j + 1
    positives = sum(y for _, y in ranked)
    negatives = len(ranked) - positives
    if positives == 0 or negatives == 0:
        return None
    rank_sum = sum(r for r, (_, y) in zip(ranks, ranked) if y)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def rollout_fidelity(predicted: str, observed: str) -> float:
    """Token F1 between the predicted rollout and the observation's content (normalized as in
    QA evaluation)."""
    return token_f1(predicted, [observed])


def names_gold_document(predicted: str, gold_titles: Sequence[str]) -> bool:
    """Whether a predicted search rollout names one of the gold documents by title."""
    text = normalize_answer(predicted)
    return any(normalize_answer(title) and f" {normalize_answer(title)} " in f" {text} "
               for title in gold_titles)


def format_validity(turns: Sequence[str], allowed=None) -> float:
    """Fraction of agent turns that parse strictly."""
    if not turns:
        raise ValueError("no turns to score")
    kwargs = {} if allowed is None else {"allowed": allowed}
    return sum(isinstance(parse_turn(t, **kwargs), AgentTurn) for t in turns) / len(turns)
