"""Renderers: a trajectory (or a plain-text document) as text segments, each with a segment
type. Preprocessing tokenizes each segment and stores the types beside the tokens, so a stage
chooses at training time which types carry loss and with what weight (WM-AMT on observations,
FE-SFT on agent turns, ...). Stage plugins register their renderers here by name."""

from __future__ import annotations

from enum import IntEnum
from typing import Callable

from megatron_foresight.data.trajectory import Trajectory
from megatron_foresight.errors import UsageError
from megatron_foresight.foresight.format import segment_turn


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
    KEYWORD = 10


Segment = tuple[str, Seg]
Renderer = Callable[[Trajectory], list[Segment]]

RENDER_VERSION = 2
"""Part of the cache key of every rendered and tokenized trajectory source: bump it when a
renderer's text or the way its segments are tokenized changes (2: an observation and its
newline are tokenized apart, the prompt through `episode_prompt`), so caches of the old tokens
are not reused."""

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
    """The renderer called `name`; a stage's renderer is registered when its plugin package
    (`plugins/<name>/`) is imported, which happens here on first use."""
    if name not in RENDERERS:
        _import_stage(name)
    if name not in RENDERERS:
        known = ", ".join(sorted([*RENDERERS, TEXT_RENDERER]))
        raise UsageError(f"unknown renderer {name!r}; known renderers: {known}")
    return RENDERERS[name]


def _import_stage(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec("plugins") and importlib.util.find_spec(f"plugins.{name}"):
        importlib.import_module(f"plugins.{name}")


def agent_segments(text: str) -> list[Segment]:
    """An agent turn by kind: think, plan, rollout and value blocks, the rest as action."""
    return [(piece, Seg[kind.upper()]) for piece, kind in segment_turn(text)]


@register_renderer("transcript")
def transcript(trajectory: Trajectory) -> list[Segment]:
    """The episode as the agent saw it: the prompt, then its turns (cut into think / plan /
    rollout / value / action pieces) and the environment's, each turn ending in a newline.

    Segments are tokenized one by one, and split where the agent loop (`inference.agent`)
    encodes separately, so a BPE tokenizer gives the tokens the model reads when it plays: the
    prompt and its newline are one piece (with a chat template, preprocessing replaces it by
    `tokenizer.episode_prompt`'s opening), an observation and its newline are two."""
    segments = [(trajectory.prompt + "\n", Seg.PROMPT)]
    for turn in trajectory.turns:
        if turn.role == "agent":
            segments += agent_segments(turn.text)
            segments.append(("\n", Seg.ACTION))
        else:
            segments += [(turn.text, Seg.OBSERVATION), ("\n", Seg.OBSERVATION)]
    return segments
