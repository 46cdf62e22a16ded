"""The versions of the foresight format, each with its renderer, strict and lenient parsers,
instruction and stop strings; a recipe names one (`foresight_format: v1 | v2`) and every part
that writes or reads a turn (FE-SFT's hindsight traces, the agent loop, rewards, evaluation)
takes it from there.

v1 (`format.py`):

    <think> ... </think>                                  (optional)
    <foresight> <plan> .. </plan> <rollout> .. </rollout> <value> 0.75 </value> </foresight>
    <search> query </search>  |  <calc> .. </calc>  |  <answer> .. </answer>

v2, the tag set a secondary summary of arXiv 2606.27483 reports (not confirmed from the paper
itself): the predicted observation, keywords expected in what comes back, an analysis (the
plan), a confidence in percent, then the reasoning and the action:

    <imaginary> the observation the environment is predicted to return </imaginary>
    <keyword> Kalo; Mirten </keyword>
    <analysis> the plan </analysis>
    <confidence> 75% </confidence>
    <think> ... </think>                                  (optional)
    <action><search> query </search></action>

`none`: no foresight at all (the bare prompt; think and the action), the format-free baseline.

All read into the same `AgentTurn` / `LenientTurn` (the rollout, the plan, the value in [0, 1],
and v2's keywords), so rewards and scores are written once for both."""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_foresight.foresight import format as v1
from megatron_foresight.foresight.action import Action, FormatError, parse_action, render_action
from megatron_foresight.foresight.format import (
    AgentTurn, BlockError, Foresight, LenientTurn, find_block, read_block, skip_space,
)
from megatron_foresight.foresight.tags import (
    ACTION, ANALYSIS, CONFIDENCE, IMAGINARY, KEYWORD, THINK, action_tags, closing, opening,
)

_PERCENT = re.compile(r"^(100|\d{1,2})(\.\d+)?\s*%?$")


@dataclass(frozen=True)
class ForesightFormat:
    """A version of the format: v1's functions, overridden by v2."""

    name: str = "v1"

    def render_turn(self, turn: AgentTurn) -> str:
        return v1.render_turn(turn)

    def parse_turn(self, text: str, allowed: tuple[str, ...] | None = None
                   ) -> AgentTurn | FormatError:
        return v1.parse_turn(text, allowed)

    def parse_turn_lenient(self, text: str, allowed: tuple[str, ...] | None = None
                           ) -> LenientTurn:
        return v1.parse_turn_lenient(text, allowed)

    def prompt(self, task_prompt: str) -> str:
        """A task prompt that asks for foresight in this version."""
        return v1.foresight_prompt(task_prompt)

    def stop_texts(self) -> tuple[str, ...]:
        """Where a generated turn ends: the closing tag of an action."""
        return tuple(closing(t) for t in action_tags())

    @property
    def foresight(self) -> bool:
        """Whether turns in this version carry foresight (every version but `none`)."""
        return True


V2_INSTRUCTION = (
    f"Before each action, write {opening(IMAGINARY)} with the observation you expect the "
    f"environment to return, {opening(KEYWORD)} with the words you expect in it (separated by "
    f"';'), {opening(ANALYSIS)} with your plan and {opening(CONFIDENCE)}: the chance from 0% to "
    f"100% that the task ends in success; then {opening(THINK)} if you need it, and the action "
    f"inside {opening(ACTION)}.")


def render_confidence(value: float) -> str:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a confidence is a probability in [0, 1], got {value}")
    return f"{round(value * 100)}%"


def read_confidence(text: str) -> float | None:
    """A confidence in percent ("75%", "75") as a probability, or None."""
    m = _PERCENT.match(text.strip())
    return None if m is None else float(text.strip().rstrip("%").strip()) / 100


def read_keywords(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in re.split(r"[;,\n]", text) if k.strip())


@dataclass(frozen=True)
class PaperFormat(ForesightFormat):
    name: str = "v2"

    def render_turn(self, turn: AgentTurn) -> str:
        parts = []
        f = turn.foresight
        if f is not None:
            parts += [f"{opening(IMAGINARY)}{f.rollout}{closing(IMAGINARY)}",
                      f"{opening(KEYWORD)}{'; '.join(f.keywords)}{closing(KEYWORD)}",
                      f"{opening(ANALYSIS)}{f.plan}{closing(ANALYSIS)}",
                      f"{opening(CONFIDENCE)}{render_confidence(f.value)}{closing(CONFIDENCE)}"]
        if turn.think is not None:
            parts.append(f"{opening(THINK)}{turn.think}{closing(THINK)}")
        a = turn.action
        parts.append(f"{opening(ACTION)}{render_action(a.kind, a.argument)}"
                     f"{closing(ACTION)}")
        return "\n".join(parts)

    def parse_turn(self, text: str, allowed: tuple[str, ...] | None = None
                   ) -> AgentTurn | FormatError:
        allowed = action_tags() if allowed is None else allowed
        try:
            return self._strict(text, allowed)
        except BlockError as fail:
            return fail.error

    def _strict(self, text: str, allowed: tuple[str, ...]) -> AgentTurn:
        rollout, pos = read_block(text, skip_space(text, 0), IMAGINARY)
        keywords, pos = read_block(text, skip_space(text, pos), KEYWORD)
        plan, pos = read_block(text, skip_space(text, pos), ANALYSIS)
        at = skip_space(text, pos)
        raw, pos = read_block(text, at, CONFIDENCE)
        value = read_confidence(raw)
        if value is None:
            raise BlockError(f"the confidence must be a percentage from 0% to 100% such as 75%, got "
                        f"{raw!r}", at)
        pos = skip_space(text, pos)
        think = None
        if text.startswith(opening(THINK), pos):
            think, pos = read_block(text, pos, THINK)
            pos = skip_space(text, pos)
        if not text.startswith(opening(ACTION), pos):
            raise BlockError(f"expected {opening(ACTION)} after the foresight", pos)
        start = skip_space(text, pos + len(opening(ACTION)))
        kind = next((t for t in action_tags() if text.startswith(opening(t), start)), None)
        if kind is None or kind not in allowed:
            names = " or ".join(opening(t) for t in allowed)
            raise BlockError(f"expected the action ({names}) inside {opening(ACTION)}", start)
        argument, end = read_block(text, start, kind)
        if not argument:
            raise BlockError(f"{opening(kind)} is empty", start)
        end = skip_space(text, end)
        if not text.startswith(closing(ACTION), end):
            raise BlockError(f"expected {closing(ACTION)} after the action", end)
        rest = skip_space(text, end + len(closing(ACTION)))
        if rest < len(text):
            raise BlockError("text after the action; the action ends the turn", rest)
        return AgentTurn(Action(kind, argument, start),
                         Foresight(plan, rollout, value, read_keywords(keywords)), think)

    def parse_turn_lenient(self, text: str, allowed: tuple[str, ...] | None = None
                           ) -> LenientTurn:
        strict = self.parse_turn(text, allowed)
        if isinstance(strict, AgentTurn):
            f = strict.foresight
            return LenientTurn(strict.action, f.plan, f.rollout, f.value, strict.think,
                               keywords=f.keywords)
        raw_value = find_block(text, CONFIDENCE)
        raw_keywords = find_block(text, KEYWORD)
        action = parse_action(text, allowed)
        return LenientTurn(action if isinstance(action, Action) else None,
                           find_block(text, ANALYSIS), find_block(text, IMAGINARY),
                           None if raw_value is None else read_confidence(raw_value),
                           find_block(text, THINK), (strict,),
                           None if raw_keywords is None else read_keywords(raw_keywords))

    def prompt(self, task_prompt: str) -> str:
        return task_prompt if task_prompt.startswith(V2_INSTRUCTION) else \
            f"{V2_INSTRUCTION}\n{task_prompt}"

    def stop_texts(self) -> tuple[str, ...]:
        return (closing(ACTION),)


@dataclass(frozen=True)
class PlainFormat(ForesightFormat):
    """No foresight: the task's own prompt, and turns of an optional <think> and the action
    (the format-free traces FE-SFT blends in, on their own). The format-free baselines of
    `foresight experiment` train and play in it; a turn that writes a v1 foresight block
    anyway still reads."""

    name: str = "none"

    def parse_turn(self, text: str, allowed: tuple[str, ...] | None = None
                   ) -> AgentTurn | FormatError:
        return v1.parse_turn(text, allowed, require_foresight=False)

    def parse_turn_lenient(self, text: str, allowed: tuple[str, ...] | None = None
                           ) -> LenientTurn:
        """The action and the reasoning; never a plan, rollout or value: a format-free turn
        is not scored on foresight, even a stray block."""
        strict = self.parse_turn(text, allowed)
        if isinstance(strict, AgentTurn):
            return LenientTurn(strict.action, None, None, None, strict.think)
        lenient = v1.parse_turn_lenient(text, allowed)
        return LenientTurn(lenient.action, None, None, None, lenient.think, (strict,))

    def prompt(self, task_prompt: str) -> str:
        return task_prompt

    @property
    def foresight(self) -> bool:
        return False


FORMATS = {"v1": ForesightFormat(), "v2": PaperFormat(), "none": PlainFormat()}


def get_format(name: str) -> ForesightFormat:
    if name not in FORMATS:
        raise ValueError(f"foresight format {name!r}: one of {', '.join(FORMATS)}")
    return FORMATS[name]
