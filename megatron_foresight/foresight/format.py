"""The foresight format (v1; README, "Two versions of the foresight format"): rendering an agent
turn, and reading one back, strictly (a typed turn, or a `FormatError` with the offending
offset) or leniently (whatever can be recovered from partly malformed model output, with the
problems listed). Neither raises on any text: malformed output is data for the format reward.

    <think> free reasoning </think>                  (optional)
    <foresight>
    <plan> the next action (and what follows) </plan>
    <rollout> the observation the environment is predicted to return </rollout>
    <value> 0.00 .. 1.00 </value>                    (probability the task ends in success)
    </foresight>
    <search> query </search> | <calc> expression </calc> | <answer> final answer </answer>

Block contents are stripped of surrounding whitespace and may not contain a tag of the format
(the rollout holds the observation's content, not its <information> / <result> wrapper)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from megatron_foresight.foresight.action import Action, FormatError, parse_action, render_action
from megatron_foresight.foresight.tags import (
    ANALYSIS, CONFIDENCE, FORESIGHT, IMAGINARY, KEYWORD, PLAN, ROLLOUT, THINK, VALUE, action_tags,
    all_tags, closing, observation_tags, opening,
)

VALUE_DECIMALS = 2
_VALUE = re.compile(r"^(0(\.\d+)?|1(\.0+)?|\.\d+)$")


@dataclass(frozen=True)
class Foresight:
    plan: str
    rollout: str
    value: float
    keywords: tuple[str, ...] = ()
    """Words expected in the observation (the v2 format's <keyword>; v1 has none)."""


@dataclass(frozen=True)
class AgentTurn:
    action: Action
    foresight: Foresight | None = None
    think: str | None = None


def render_value(value: float) -> str:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a foresight value is a probability in [0, 1], got {value}")
    return f"{value:.{VALUE_DECIMALS}f}"


def render_foresight(foresight: Foresight) -> str:
    return (f"{opening(FORESIGHT)}\n{opening(PLAN)}{foresight.plan}{closing(PLAN)}\n"
            f"{opening(ROLLOUT)}{foresight.rollout}{closing(ROLLOUT)}\n"
            f"{opening(VALUE)}{render_value(foresight.value)}{closing(VALUE)}\n"
            f"{closing(FORESIGHT)}")


def render_turn(turn: AgentTurn) -> str:
    parts = []
    if turn.think is not None:
        parts.append(f"{opening(THINK)}{turn.think}{closing(THINK)}")
    if turn.foresight is not None:
        parts.append(render_foresight(turn.foresight))
    parts.append(render_action(turn.action.kind, turn.action.argument))
    return "\n".join(parts)


FORESIGHT_INSTRUCTION = (
    f"Before each action, write {opening(FORESIGHT)} with your {opening(PLAN)}, the "
    f"{opening(ROLLOUT)} you expect the environment to return and the {opening(VALUE)}: the "
    f"chance from 0.00 to 1.00 that the task ends in success.")


def foresight_prompt(prompt: str) -> str:
    """A task prompt that asks for foresight: FE-SFT trains on it and the agent loop plays
    with it, so the foresight format is asked for, not guessed from the task (format-free
    traces in the same blend keep the bare prompt)."""
    if prompt.startswith(FORESIGHT_INSTRUCTION):
        return prompt
    return f"{FORESIGHT_INSTRUCTION}\n{prompt}"


@lru_cache(maxsize=8)
def _any_tag(tags: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for tag in tags for t in (opening(tag), closing(tag))))


@lru_cache(maxsize=8)
def _observation(tags: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"{re.escape(opening(t))}(.*?){re.escape(closing(t))}"
                               for t in tags), re.DOTALL)


def observation_content(observation: str) -> str:
    """What a rollout predicts of an environment turn: its content without the <information> /
    <result> wrapper (the whole text, stripped, when there is none)."""
    m = _observation(observation_tags()).search(observation)
    content = next(g for g in m.groups() if g is not None) if m else observation
    return content.strip()


def final_observation(success: bool | None) -> str:
    """The rollout target of a turn the environment answers by ending the episode: whether the
    answer was accepted (None: the turn budget ran out)."""
    if success is None:
        return "The episode ends without an answer."
    return "The answer is correct." if success else "The answer is wrong."


# The kind of each block, in either version: v2's blocks are v1's under other names, and its
# keywords a kind of their own.
BLOCK_KINDS = {THINK: THINK, PLAN: PLAN, ROLLOUT: ROLLOUT, VALUE: VALUE, IMAGINARY: ROLLOUT,
               ANALYSIS: PLAN, CONFIDENCE: VALUE, KEYWORD: KEYWORD}
_SEGMENT_BLOCK = re.compile("|".join(
    f"{re.escape(opening(t))}.*?{re.escape(closing(t))}" for t in BLOCK_KINDS), re.DOTALL)


def segment_turn(text: str) -> list[tuple[str, str]]:
    """An agent turn (of either format version) cut into consecutive pieces, each named for
    what it is: `think`, `plan`, `rollout`, `value`, `keyword` (a block with its tags), or
    `action` (the rest: the action, the <foresight> / <action> wrapper, whitespace, malformed
    text). The pieces join back to `text`; training weights each kind's tokens separately."""
    pieces, pos = [], 0
    for m in _SEGMENT_BLOCK.finditer(text):
        if m.start() > pos:
            pieces.append((text[pos:m.start()], "action"))
        pieces.append((m.group(0), BLOCK_KINDS[m.group(0)[1:m.group(0).index(">")]]))
        pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], "action"))
    return pieces


class BlockError(Exception):
    """Where strict reading failed; the parsers turn it into a `FormatError` value."""

    def __init__(self, message: str, offset: int):
        self.error = FormatError(message, offset)


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def read_block(text: str, pos: int, tag: str) -> tuple[str, int]:
    """The stripped content of the `tag` block opening at `pos`, and the offset after it."""
    if not text.startswith(opening(tag), pos):
        found = text[pos:pos + 12] or "the end"
        raise BlockError(f"expected {opening(tag)}, found {found!r}", pos)
    start = pos + len(opening(tag))
    end = text.find(closing(tag), start)
    if end < 0:
        raise BlockError(f"{opening(tag)} is never closed with {closing(tag)}", pos)
    inner = _any_tag(all_tags()).search(text, start, end)
    if inner:
        raise BlockError(f"{inner.group(0)} inside {opening(tag)}", inner.start())
    return text[start:end].strip(), end + len(closing(tag))


def _value(text: str, at: int) -> float:
    if not _VALUE.match(text):
        raise BlockError(f"the value must be a number from 0 to 1 such as 0.75, got {text!r}", at)
    return float(text)


def parse_turn(text: str, allowed: tuple[str, ...] | None = None,
               require_foresight: bool = True) -> AgentTurn | FormatError:
    """The strict reading: the whole turn must follow the grammar above, its action one of
    `allowed` (default: any action of the format)."""
    allowed = action_tags() if allowed is None else allowed
    try:
        pos = skip_space(text, 0)
        think = None
        if text.startswith(opening(THINK), pos):
            think, pos = read_block(text, pos, THINK)
            pos = skip_space(text, pos)
        foresight = None
        if text.startswith(opening(FORESIGHT), pos) or require_foresight:
            if not text.startswith(opening(FORESIGHT), pos):
                raise BlockError(f"expected {opening(FORESIGHT)} before the action", pos)
            pos = skip_space(text, pos + len(opening(FORESIGHT)))
            plan, pos = read_block(text, pos, PLAN)
            rollout, pos = read_block(text, skip_space(text, pos), ROLLOUT)
            value_at = skip_space(text, pos)
            raw_value, pos = read_block(text, value_at, VALUE)
            value = _value(raw_value, value_at)
            pos = skip_space(text, pos)
            if not text.startswith(closing(FORESIGHT), pos):
                raise BlockError(f"expected {closing(FORESIGHT)} after {closing(VALUE)}", pos)
            foresight = Foresight(plan, rollout, value)
            pos = skip_space(text, pos + len(closing(FORESIGHT)))
        kind = next((t for t in action_tags() if text.startswith(opening(t), pos)), None)
        if kind is None:
            names = " or ".join(opening(t) for t in allowed)
            raise BlockError(f"expected the action ({names})", pos)
        if kind not in allowed:
            raise BlockError(f"{opening(kind)} is not available here", pos)
        argument, end = read_block(text, pos, kind)
        if not argument:
            raise BlockError(f"{opening(kind)} is empty", pos)
        rest = skip_space(text, end)
        if rest < len(text):
            raise BlockError("text after the action; the action ends the turn", rest)
        return AgentTurn(Action(kind, argument, pos), foresight, think)
    except BlockError as fail:
        return fail.error


@dataclass(frozen=True)
class LenientTurn:
    """What could be read from a turn, each part None when missing or malformed."""

    action: Action | None
    plan: str | None
    rollout: str | None
    value: float | None
    think: str | None
    errors: tuple[FormatError, ...] = field(default_factory=tuple)
    """Empty exactly when the turn parses strictly."""
    keywords: tuple[str, ...] | None = None
    """The v2 format's <keyword> list (None in v1, or when missing)."""


def find_block(text: str, tag: str) -> str | None:
    match = re.search(re.escape(opening(tag)) + r"(.*?)" + re.escape(closing(tag)), text,
                      re.DOTALL)
    return match.group(1).strip() if match else None


def parse_turn_lenient(text: str, allowed: tuple[str, ...] | None = None) -> LenientTurn:
    strict = parse_turn(text, allowed)
    if isinstance(strict, AgentTurn):
        f = strict.foresight
        return LenientTurn(strict.action, f.plan, f.rollout, f.value, strict.think)
    raw_value = find_block(text, VALUE)
    value = float(raw_value) if raw_value is not None and _VALUE.match(raw_value) else None
    return LenientTurn(_recover_action(text, allowed), find_block(text, PLAN),
                       find_block(text, ROLLOUT), value, find_block(text, THINK), (strict,))


def _recover_action(text: str, allowed: tuple[str, ...]) -> Action | None:
    """The action, also when a reasoning block was left unclosed (which hides the rest of the
    turn from `parse_action`): then it is looked for after the last closing tag of the
    foresight or think block."""
    action = parse_action(text, allowed)
    if isinstance(action, Action):
        return action
    ends = [text.rfind(closing(t)) + len(closing(t)) for t in (THINK, FORESIGHT, PLAN, ROLLOUT,
                                                                  VALUE) if closing(t) in text]
    if not ends:
        return None
    start = max(ends)
    action = parse_action(text[start:], allowed)
    if not isinstance(action, Action):
        return None
    return Action(action.kind, action.argument, action.offset + start)
