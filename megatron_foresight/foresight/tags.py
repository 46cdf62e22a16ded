"""The tag sets of the foresight format. A recipe names the version it trains in
(`foresight_format`, `foresight.formats`): v1 is the project's own format (a <foresight> block of
plan, rollout and value before the action); v2 is the tag set a secondary summary of arXiv
2606.27483 reports (not confirmed from the paper itself): <imaginary> (the rollout), <keyword>,
<analysis>, <confidence> (0-100%), then <think> and the <action>. A tokenizer for the tiny
default makes each v1 tag a single token.

The reasoning tags and `<answer>` are the format's own. Tool actions and observations belong to
environments: the built-in ones (`<search>` / `<information>`, `<calc>` / `<result>`) are listed
here, and an environment registered later (`envs.registry`) adds its tags with
`register_tool_tags`, so the parsers read its actions too."""

from __future__ import annotations

import re

FORMAT_VERSION = 1

THINK = "think"
FORESIGHT, PLAN, ROLLOUT, VALUE = "foresight", "plan", "rollout", "value"
SEARCH, CALC, ANSWER = "search", "calc", "answer"
INFORMATION, RESULT = "information", "result"
IMAGINARY, KEYWORD, ANALYSIS, CONFIDENCE, ACTION = (
    "imaginary", "keyword", "analysis", "confidence", "action")
V2_TAGS = (IMAGINARY, KEYWORD, ANALYSIS, CONFIDENCE, ACTION)

# What the agent may do, and what the environment writes back (the built-in environments').
ACTION_TAGS = (SEARCH, CALC, ANSWER)
OBSERVATION_TAGS = (INFORMATION, RESULT)
# Blocks whose content is the agent's own writing, never an action to carry out.
REASONING_TAGS = (THINK, FORESIGHT, IMAGINARY, KEYWORD, ANALYSIS, CONFIDENCE)

TAGS = (THINK, FORESIGHT, PLAN, ROLLOUT, VALUE, *ACTION_TAGS, *OBSERVATION_TAGS)

_TAG_NAME = re.compile(r"[a-z][a-z0-9_]*")
_extra_actions: list[str] = []
_extra_observations: list[str] = []


def register_tool_tags(actions: tuple[str, ...], observation: str) -> None:
    """Make an environment's tool tags part of the format (idempotent). Refuses names that
    are not lower-case words or that are the format's own reasoning or value tags."""
    reserved = {THINK, FORESIGHT, PLAN, ROLLOUT, VALUE, ANSWER, *V2_TAGS}
    for tag in (*actions, observation):
        if not _TAG_NAME.fullmatch(tag) or tag in reserved:
            raise ValueError(f"tag {tag!r}: tool tags are lower-case words and not one of the "
                             f"format's own ({', '.join(sorted(reserved))})")
    for tag in actions:
        if tag not in ACTION_TAGS and tag not in _extra_actions:
            _extra_actions.append(tag)
    if observation not in OBSERVATION_TAGS and observation not in _extra_observations:
        _extra_observations.append(observation)


def action_tags() -> tuple[str, ...]:
    """Every action the parsers recognize: the built-in ones and registered environments'."""
    return (*ACTION_TAGS, *_extra_actions)


def observation_tags() -> tuple[str, ...]:
    return (*OBSERVATION_TAGS, *_extra_observations)


def all_tags() -> tuple[str, ...]:
    """Every tag of every version and of registered environments."""
    return (*TAGS, *V2_TAGS, *_extra_actions, *_extra_observations)


def opening(tag: str) -> str:
    return f"<{tag}>"


def closing(tag: str) -> str:
    return f"</{tag}>"


def wrap(tag: str, content: str) -> str:
    return f"{opening(tag)}{content}{closing(tag)}"


def symbols() -> list[str]:
    """Every opening and closing tag of the built-in format, in a fixed order (the tiny
    default's tokenizer makes each one token; registered environments' tags are not added, so
    the tokenizer does not depend on what was imported)."""
    return [s for tag in TAGS for s in (opening(tag), closing(tag))]
