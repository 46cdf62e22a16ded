"""FC-RL's rewards, as pure functions of text and outcomes, and where each one is credited.

Components (each weighted by the recipe and logged on its own):

* task: the environment's verdict on the final answer: exact match (or token F1) against the
  gold answers for search, the verified answer for math; 0 when the episode ends without one.
* calibration: a proper scoring rule of each turn's <value> against the episode's outcome:
  `-(value - success)^2` (Brier, default) or `log p(outcome)` (log score); a turn without a
  readable value earns the worst score of the rule.
* fidelity: token F1 of each turn's <rollout> against the observation that really followed
  (for the turn that ended the episode, `format.final_observation`); 0 without a rollout.
* format: 0 for a turn that parses strictly, `-1` otherwise.

Credit: the task reward belongs to the whole episode (every agent token); a turn's calibration
reward to the tokens of that turn's <value> block, its fidelity reward to the tokens of its
<rollout> block, its format reward to all of that turn's tokens. `credit_spans` gives those
token ranges; `rl.advantages.token_advantages` puts each component's advantage on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from megatron_foresight.answers import exact_match, token_f1
from megatron_foresight.foresight.format import AgentTurn, parse_turn, parse_turn_lenient, segment_turn
from megatron_foresight.foresight.scores import rollout_fidelity
from megatron_foresight.foresight.tags import ROLLOUT, VALUE

CALIBRATION_RULES = ("brier", "log")
LOG_EPS = 1e-3
"""The log score clips values to [LOG_EPS, 1 - LOG_EPS]: a confident miss costs log(1e-3)."""


def search_task_reward(answer: str | None, golds: Sequence[str], metric: str = "em") -> float:
    """Exact match (`em`) or token F1 (`f1`) of the answer against the gold answers."""
    if metric not in ("em", "f1"):
        raise ValueError(f"search task reward metric is 'em' or 'f1', got {metric!r}")
    if answer is None:
        return 0.0
    return (exact_match if metric == "em" else token_f1)(answer, list(golds))


def calibration_reward(value: float | None, success: bool, rule: str = "brier") -> float:
    """A proper scoring rule of the value as P(success), as a reward (higher is better):
    Brier: -(value - y)^2 in [-1, 0]; log: log of the probability given to what happened."""
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"calibration rule is one of {CALIBRATION_RULES}, got {rule!r}")
    y = float(bool(success))
    if value is None:  # no readable value: the worst the rule gives
        return -1.0 if rule == "brier" else math.log(LOG_EPS)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a value is a probability in [0, 1], got {value}")
    if rule == "brier":
        return -(value - y) ** 2
    p = min(max(value, LOG_EPS), 1 - LOG_EPS)
    return math.log(p if y else 1 - p)


def fidelity_reward(rollout: str | None, observed: str) -> float:
    """Token F1 of the predicted rollout against what the environment returned; 0 without one."""
    return 0.0 if rollout is None else rollout_fidelity(rollout, observed)


def format_reward(text: str) -> float:
    """0 for a turn that parses strictly (foresight block required), -1 otherwise."""
    return 0.0 if isinstance(parse_turn(text), AgentTurn) else -1.0


@dataclass(frozen=True)
class TurnRewards:
    """The per-turn components of one agent turn (unweighted)."""

    calibration: float
    fidelity: float
    format: float


def turn_rewards(text: str, observed: str, success: bool, rule: str = "brier") -> TurnRewards:
    """Every per-turn component of one agent turn, reading the turn leniently."""
    lenient = parse_turn_lenient(text)
    return TurnRewards(calibration_reward(lenient.value, success, rule),
                       fidelity_reward(lenient.rollout, observed),
                       0.0 if not lenient.errors else -1.0)


def char_spans(text: str) -> dict[str, tuple[int, int]]:
    """Character ranges [start, end) of the turn's first <rollout> and <value> blocks, tags
    included (absent blocks are left out)."""
    spans, pos = {}, 0
    for piece, kind in segment_turn(text):
        if kind in (ROLLOUT, VALUE) and kind not in spans:
            spans[kind] = (pos, pos + len(piece))
        pos += len(piece)
    return spans


def token_char_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """For each token, the length of the text decoded from the tokens up to and including it.
    Decoding prefixes (not single tokens) keeps what a tokenizer adds or merges at boundaries."""
    return [len(tokenizer.decode(list(ids[:i + 1]))) for i in range(len(ids))]


def credit_spans(tokenizer, ids: Sequence[int], text: str | None = None
                 ) -> dict[str, tuple[int, int]]:
    """Token ranges [start, end) of the turn's <rollout> and <value> blocks in `ids` (the ids
    the policy sampled): a token belongs to a block when any of its characters do."""
    text = tokenizer.decode(list(ids)) if text is None else text
    ends = token_char_ends(tokenizer, ids)
    starts = [0] + ends[:-1]
    out = {}
    for kind, (a, b) in char_spans(text).items():
        inside = [i for i, (s, e) in enumerate(zip(starts, ends)) if s < b and e > a]
        if inside:
            out[kind] = (inside[0], inside[-1] + 1)
    return out
