"""The tag set of the foresight format, versioned. A recipe names the version it was trained
with; a tokenizer for the tiny default makes each tag below a single token."""

from __future__ import annotations

FORMAT_VERSION = 1

THINK = "think"
FORESIGHT, PLAN, ROLLOUT, VALUE = "foresight", "plan", "rollout", "value"
SEARCH, CALC, ANSWER = "search", "calc", "answer"
INFORMATION, RESULT = "information", "result"

# What the agent may do, and what the environment writes back.
ACTION_TAGS = (SEARCH, CALC, ANSWER)
OBSERVATION_TAGS = (INFORMATION, RESULT)
# Blocks whose content is the agent's own writing, never an action to carry out.
REASONING_TAGS = (THINK, FORESIGHT)

TAGS = (THINK, FORESIGHT, PLAN, ROLLOUT, VALUE, *ACTION_TAGS, *OBSERVATION_TAGS)


def opening(tag: str) -> str:
    return f"<{tag}>"


def closing(tag: str) -> str:
    return f"</{tag}>"


def wrap(tag: str, content: str) -> str:
    return f"{opening(tag)}{content}{closing(tag)}"


def symbols() -> list[str]:
    """Every opening and closing tag, in a fixed order (tokenizer user-defined symbols)."""
    return [s for tag in TAGS for s in (opening(tag), closing(tag))]
