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
token ranges; the RL algorithm (`rl.algorithms`) puts each term's advantage on them.

Each component is a registered `RewardTerm` (name, per episode or per turn, where its credit
lands, its score); a recipe weighs any registered term by name, and a new term is one
`register_reward` in one module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

from megatron_foresight.answers import exact_match, normalize_answer, token_f1
from megatron_foresight.foresight.format import (
    AgentTurn, LenientTurn, parse_turn, segment_turn,
)
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


# ----------------------------------------------------------------------------------------------
# reward terms: what the recipe weighs (`fc_rl.reward_weights`), one registration each


@dataclass(frozen=True)
class TurnContext:
    """What a per-turn reward term reads of one agent turn."""

    text: str
    parsed: LenientTurn
    """The turn read leniently (`parsed.errors` is empty exactly when it parses strictly)."""
    observed: str
    """What really followed: the observation's content, or for the last turn how it ended."""
    later: tuple[str, ...]
    """What came after the turn: its observation's content (or how the episode ended) and the
    content of every later observation of the episode."""
    success: bool
    """Whether the episode ended in success."""


@dataclass(frozen=True)
class RewardSettings:
    """The recipe's options of the reward terms."""

    calibration_rule: str = "brier"


@dataclass(frozen=True)
class RewardTerm:
    name: str
    scope: Literal["episode", "turn"]
    """Scored once per episode (`score(record, settings)`) or per agent turn
    (`score(TurnContext, settings)`)."""
    credit: str
    """The tokens its advantage lies on: "episode" (every agent token of the episode), "turn"
    (every token of its turn), or a block of the foresight format ("value", "rollout",
    "keyword": that block's tokens in its turn). PPO's per-token reward sits on the last of
    those tokens (the turn's last when the block is missing; the episode's last agent token for
    "episode")."""
    score: Callable[..., float]
    description: str = ""


REWARD_TERMS: dict[str, RewardTerm] = {}


def register_reward(term: RewardTerm) -> RewardTerm:
    """Add a reward term a recipe can weigh (from any module imported before the recipe)."""
    if term.scope not in ("episode", "turn"):
        raise ValueError(f"reward term {term.name!r}: scope is 'episode' or 'turn'")
    if term.scope == "episode" and term.credit != "episode":
        raise ValueError(f"reward term {term.name!r}: an episode's reward is credited to the "
                         "episode")
    if REWARD_TERMS.get(term.name, term) is not term:
        raise ValueError(f"reward term {term.name!r} is already registered")
    REWARD_TERMS[term.name] = term
    return term


register_reward(RewardTerm(
    "task", "episode", "episode", lambda record, settings: record.reward,
    "the environment's verdict on the final answer (0 without one)"))
register_reward(RewardTerm(
    "calibration", "turn", VALUE,
    lambda t, settings: calibration_reward(t.parsed.value, t.success, settings.calibration_rule),
    "a proper scoring rule (fc_rl.calibration_rule) of the <value> against the outcome"))
register_reward(RewardTerm(
    "fidelity", "turn", ROLLOUT, lambda t, settings: fidelity_reward(t.parsed.rollout, t.observed),
    "token F1 of the <rollout> against the observation that followed"))
register_reward(RewardTerm(
    "format", "turn", "turn", lambda t, settings: 0.0 if not t.parsed.errors else -1.0,
    "0 for a turn that parses strictly, -1 otherwise"))


# The paper variant's terms, as a secondary summary of arXiv 2606.27483 reports them (not
# confirmed from the paper itself); used with the v2 tag set and the step_grpo algorithm.


def confidence_reward(value: float | None, success: bool) -> float:
    """I - (q - I)^2 with I the episode's success (0 or 1) and q the stated confidence; a turn
    without a readable confidence is scored as if it had said the opposite of what happened."""
    y = float(bool(success))
    q = 1.0 - y if value is None else value
    return y - (q - y) ** 2


def grounding_reward(keywords: Sequence[str] | None, later: Sequence[str]) -> float:
    """The share of the predicted keywords found (as whole words, after normalization) in what
    came back after the turn; 0 without keywords."""
    if not keywords:
        return 0.0
    future = f" {' '.join(normalize_answer(text) for text in later)} "
    found = [normalize_answer(k) for k in keywords]
    return sum(bool(k) and f" {k} " in future for k in found) / len(found)


register_reward(RewardTerm(
    "confidence", "turn", VALUE,
    lambda t, settings: confidence_reward(t.parsed.value, t.success),
    "the paper's calibration: I - (q - I)^2 of the stated confidence q against success I"))
register_reward(RewardTerm(
    "grounding", "turn", "keyword",
    lambda t, settings: grounding_reward(t.parsed.keywords, t.later),
    "the share of the turn's <keyword>s found in the observations that followed"))


def char_spans(text: str) -> dict[str, tuple[int, int]]:
    """Character ranges [start, end) of the turn's first block of each kind (`segment_turn`:
    rollout, value, plan, think, ...), tags included (absent blocks are left out)."""
    spans, pos = {}, 0
    for piece, kind in segment_turn(text):
        if kind != "action" and kind not in spans:
            spans[kind] = (pos, pos + len(piece))
        pos += len(piece)
    return spans


def token_char_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """For each token, the length of the text decoded from the tokens up to and including it.
    Decoding prefixes (not single tokens) keeps what a tokenizer adds or merges at boundaries."""
    return [len(tokenizer.decode(list(ids[:i + 1]))) for i in range(len(ids))]


def credit_spans(tokenizer, ids: Sequence[int], text: str | None = None
                 ) -> dict[str, tuple[int, int]]:
    """Token ranges [start, end) of the turn's blocks (`char_spans`) in `ids` (the ids the
    policy sampled): a token belongs to a block when any of its characters do."""
    text = tokenizer.decode(list(ids)) if text is None else text
    ends = token_char_ends(tokenizer, ids)
    starts = [0] + ends[:-1]
    out = {}
    for kind, (a, b) in char_spans(text).items():
        inside = [i for i, (s, e) in enumerate(zip(starts, ends)) if s < b and e > a]
        if inside:
            out[kind] = (inside[0], inside[-1] + 1)
    return out
