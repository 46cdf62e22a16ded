"""Reading the action out of an agent turn. Malformed text is a `FormatError` value (what is
wrong and where), never an exception: it is data for the format reward."""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_foresight.foresight.tags import (
    REASONING_TAGS, action_tags, closing, opening,
)


@dataclass(frozen=True)
class Action:
    kind: str
    """One of `tags.action_tags()`."""
    argument: str
    """The text between the tags, stripped."""
    offset: int
    """Character offset of the opening tag in the turn."""


def render_action(kind: str, argument: str) -> str:
    """An action as agents write it: `<search> query </search>`, the argument between spaces
    (as the prompts show it). A tokenizer with a word-start marker then reads the argument's
    first word as running text has it (sentencepiece: `▁Olgar`, not `Olgar` glued to the
    tag), so a name is copied from the question token for token, not re-spelled."""
    return f"{opening(kind)} {argument} {closing(kind)}"


@dataclass(frozen=True)
class FormatError:
    message: str
    offset: int

    def __str__(self) -> str:
        return f"at character {self.offset}: {self.message}"


def _blank_reasoning(text: str) -> str:
    """`text` with <think> and <foresight> blocks replaced by spaces (offsets kept), so a plan
    that mentions <search> is not taken for an action. An unclosed block runs to the end."""
    for tag in REASONING_TAGS:
        pattern = re.compile(re.escape(opening(tag)) + r".*?(" + re.escape(closing(tag)) + r"|\Z)",
                             re.DOTALL)
        text = pattern.sub(lambda m: " " * len(m.group(0)), text)
    return text


def parse_action(text: str, allowed: tuple[str, ...] | None = None) -> Action | FormatError:
    """The single action in `text`, which must be one of `allowed` (default: any action of
    the format, `tags.action_tags()`)."""
    visible = _blank_reasoning(text)
    known = action_tags()
    allowed = known if allowed is None else allowed
    found = [(m.start(), m.group(1)) for m in re.finditer(r"<(\w+)>", visible)
             if m.group(1) in known]
    names = " or ".join(opening(t) for t in allowed)
    if not found:
        return FormatError(f"no action: end the turn with {names}", len(text))
    if len(found) > 1:
        return FormatError(f"more than one action ({opening(found[0][1])} and "
                           f"{opening(found[1][1])}); write exactly one", found[1][0])
    start, kind = found[0]
    if kind not in allowed:
        return FormatError(f"{opening(kind)} is not available here; use {names}", start)
    body_start = start + len(opening(kind))
    end = visible.find(closing(kind), body_start)
    if end < 0:
        return FormatError(f"{opening(kind)} is never closed with {closing(kind)}", start)
    argument = text[body_start:end].strip()
    if not argument:
        return FormatError(f"{opening(kind)} is empty", start)
    return Action(kind, argument, start)
