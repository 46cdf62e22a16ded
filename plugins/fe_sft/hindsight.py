"""Foresight-format traces from trajectories, by hindsight (FE-SFT's data).

Every agent turn of a trajectory gets the foresight block it should have written:
* `<plan>`: the action it took, and what the rest of the trajectory did after it
  ("Search for X, then 1 more search, then answer."), or the action only ("Search for X.")
  without `plan_ahead` (`fe_sft.plan_ahead: false`);
* `<rollout>`: the observation the environment really returned next (its content, without the
  <information> / <result> wrapper), or, for the turn that ended the episode, whether the answer
  was accepted (`format.final_observation`);
* `<value>`: the Monte-Carlo success estimate of the state before the turn (`mc`), rounded to
  the format's precision; a turn without an estimate takes the trajectory's outcome (0 or 1)
  and is counted in the summary.
The prompt asks for foresight (the format version's `prompt`), as the agent loop's does. The
think block and the action are kept as they were. Turns that do not parse strictly (a noisy
agent's malformed action) are kept unchanged, and counted.

The traces are written in the recipe's format version (`foresight.formats`): in v2 the same
plan, rollout and value are the <analysis>, <imaginary> and <confidence>, and its <keyword>s are
the first words of the real next observation that name something (capitalized or a number;
else its first content words)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Iterable, Iterator

from megatron_foresight.data.trajectory import Trajectory, Turn
from megatron_foresight.foresight.action import Action
import re

from megatron_foresight.foresight.format import (
    VALUE_DECIMALS, AgentTurn, Foresight, final_observation, observation_content, parse_turn,
)
from megatron_foresight.foresight.formats import FORMATS, ForesightFormat
from megatron_foresight.foresight.tags import ANSWER, CALC, SEARCH

KEYWORDS = 3
_WORD = re.compile(r"[A-Za-z0-9][\w'-]*")
_PASSAGE_HEAD = re.compile(r"Doc \d+ \(Title: ([^)]*)\)")  # search.format_passages' heading
_NOT_NAMES = {"Doc", "Title", "The", "No", "A", "An", "In", "Of"}
_STOP = {"the", "a", "an", "of", "in", "is", "was", "to", "and", "no", "by", "on", "at", "for",
         "doc", "title", "answer"}

_FIRST = {SEARCH: 'Search for {}', CALC: "Compute {}", ANSWER: "Answer {}"}
_MORE = {SEARCH: ("search", "searches"), CALC: ("calculation", "calculations")}


def plan_text(actions: list[Action], i: int, ahead: bool = True) -> str:
    """The plan of the i-th action: the action itself, then (`ahead`) the kinds of what
    followed."""
    parts = [_FIRST[actions[i].kind].format(actions[i].argument)]
    if not ahead:
        return parts[0] + "."
    later = Counter(a.kind for a in actions[i + 1:])
    for kind in (SEARCH, CALC):
        if later[kind]:
            parts.append(f"then {later[kind]} more {_MORE[kind][later[kind] > 1]}")
    if later[ANSWER]:
        parts.append("then answer")
    return ", ".join(parts) + "."


def _rollout(trajectory: Trajectory, turn_index: int, action: Action) -> str:
    turns = trajectory.turns
    if turn_index + 1 < len(turns) and turns[turn_index + 1].role == "env":
        return observation_content(turns[turn_index + 1].text)
    return final_observation(trajectory.outcome.success if action.kind == ANSWER else None)


def expected_keywords(observation: str) -> tuple[str, ...]:
    """Up to `KEYWORDS` words of an observation worth predicting: those that name something
    (capitalized, or numbers), else its first content words; each once."""
    words = _WORD.findall(_PASSAGE_HEAD.sub(r"\1", observation))
    names = [w for w in words if (w[0].isupper() or w[0].isdigit()) and w not in _NOT_NAMES]
    picked = names or [w for w in words if w.lower() not in _STOP]
    return tuple(dict.fromkeys(picked))[:KEYWORDS]


def foresight_trace(trajectory: Trajectory, tally: Counter | None = None,
                    fmt: ForesightFormat = FORMATS["v1"], plan_ahead: bool = True) -> Trajectory:
    """`trajectory` with a hindsight foresight block in every agent turn that parses, in the
    format version `fmt`; the plans name what followed each action unless not `plan_ahead`
    (`plan_text`)."""
    tally = Counter() if tally is None else tally
    values = {m.turn: m.value for m in trajectory.mc}
    agent_at = [i for i, t in enumerate(trajectory.turns) if t.role == "agent"]
    parsed = [parse_turn(trajectory.turns[i].text, require_foresight=False) for i in agent_at]
    actions = [p.action for p in parsed if isinstance(p, AgentTurn)]
    turns = list(trajectory.turns)
    j = -1  # this turn's place among the parsed actions
    for k, (i, turn) in enumerate(zip(agent_at, parsed)):
        j += isinstance(turn, AgentTurn)
        if not isinstance(turn, AgentTurn) or turn.foresight is not None:
            tally["turns kept unchanged"] += 1
            continue
        if k not in values:
            tally["values from the outcome (no MC estimate)"] += 1
        value = round(values.get(k, float(trajectory.outcome.success)), VALUE_DECIMALS)
        rollout = _rollout(trajectory, i, turn.action)
        foresight = Foresight(plan_text(actions, j, plan_ahead), rollout, value,
                              expected_keywords(rollout))
        turns[i] = Turn("agent", fmt.render_turn(replace(turn, foresight=foresight)))
        tally["turns with foresight"] += 1
    tally["trajectories"] += 1
    return replace(trajectory, prompt=fmt.prompt(trajectory.prompt), turns=tuple(turns),
                   meta={**(trajectory.meta or {}), "format": f"foresight-{fmt.name}"})


def foresight_traces(trajectories: Iterable[Trajectory], tally: Counter,
                     fmt: ForesightFormat = FORMATS["v1"],
                     plan_ahead: bool = True) -> Iterator[Trajectory]:
    for t in trajectories:
        yield foresight_trace(t, tally, fmt, plan_ahead)
