"""Renderers: a trajectory (or a plain-text document) as text segments, each with a segment
type. Preprocessing tokenizes each segment and stores the types beside the tokens, so a stage
chooses at training time which types carry loss and with what weight (WM-AMT on observations,
FE-SFT on agent turns, ...). Stage plugins register their renderers here by name."""

from __future__ import annotations

from enum import IntEnum
from typing import Callable

from megatron_foresight.data.trajectory import Trajectory
from megatron_foresight.errors import UsageError


class Seg(IntEnum):
    """What a token is. Stored as one byte per token; 0 is padding and never carries loss."""

    PAD = 0
    TEXT = 1
    PROMPT = 2
    ACTION = 3
    OBSERVATION = 4
    OUTCOME = 5
    THINK = 6
    PLAN = 7
    ROLLOUT = 8
    VALUE = 9


Segment = tuple[str, Seg]
Renderer = Callable[[Trajectory], list[Segment]]

RENDERERS: dict[str, Renderer] = {}
TEXT_RENDERER = "text"
"""The renderer of plain-text documents (a `text` field per line); not a trajectory renderer."""


def register_renderer(name: str) -> Callable[[Renderer], Renderer]:
    def add(fn: Renderer) -> Renderer:
        if name in RENDERERS or name == TEXT_RENDERER:
            raise ValueError(f"renderer {name!r} is already registered")
        RENDERERS[name] = fn
        return fn
    return add


def get_renderer(name: str) -> Renderer:
    if name not in RENDERERS:
        known = ", ".join(sorted([*RENDERERS, TEXT_RENDERER]))
        raise UsageError(f"unknown renderer {name!r}; known renderers: {known}")
    return RENDERERS[name]


@register_renderer("transcript")
def transcript(trajectory: Trajectory) -> list[Segment]:
    """The episode as the agent saw it: the prompt, then its turns and the environment's."""
    segments = [(trajectory.prompt + "\n", Seg.PROMPT)]
    for turn in trajectory.turns:
        segments.append((turn.text + "\n", Seg.ACTION if turn.role == "agent" else
                         Seg.OBSERVATION))
    return segments
