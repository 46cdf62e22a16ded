"""The interface every environment has (`Episode`): `reset` with a task gives the prompt,
`step` with the agent's turn gives the observation, whether the episode is over, and the
reward."""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_foresight.errors import UsageError
from megatron_foresight.tasks import Task
from megatron_foresight.foresight.action import Action, FormatError, parse_action
from megatron_foresight.foresight.tags import ANSWER

PROMPTS = Path(__file__).parent / "prompts"
"""The built-in environments' default prompt templates, <env>.txt (package data)."""


@dataclass
class PromptOptions:
    """The task-set option every built-in environment shares (its options derive from it)."""

    prompt_template: Optional[str] = None
    """A text file with the instruction that opens each episode: which action tags exist and
    how to answer, with {question} where the task's question goes ({{ and }} for literal
    braces; a final newline is dropped). Null: the environment's default,
    megatron_foresight/envs/prompts/<env>.txt, a starting point to copy and edit."""


def load_prompt_template(path: str | None, env: str) -> str:
    """The template `path` names, or `env`'s default; one line of error naming the file when it
    does not read or has a placeholder other than {question}, or none."""
    file = Path(path) if path else PROMPTS / f"{env}.txt"
    try:
        text = file.read_text(encoding="utf-8").removesuffix("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"prompt template {file}: cannot read it ({e})") from None
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise UsageError(f"prompt template {file}: {e} (write {{{{ and }}}} for a literal "
                         "brace)") from None
    if names - {"question"}:
        unknown = ", ".join("{" + n + "}" for n in sorted(names - {"question"}))
        raise UsageError(f"prompt template {file}: unknown placeholder {unknown}; the only one "
                         "is {question} (write {{ and }} for a literal brace)")
    if "question" not in names:
        raise UsageError(f"prompt template {file}: no {{question}} placeholder, where each "
                         "task's question goes")
    return text


@dataclass(frozen=True)
class StepResult:
    observation: str | None
    """The environment's turn (tagged), or None when the episode ended."""
    done: bool
    reward: float
    info: dict = field(default_factory=dict)
    """`success` (bool) once done; `format_error` when the turn had no valid action."""


class Episode(ABC):
    """An environment: the task, the turn budget and the action grammar are shared; each
    environment supplies its prompt, its tool (`tool`) and how an answer is scored (`score`)."""

    task_type: str
    tools: tuple[str, ...]
    observation_tag: str

    def __init__(self, max_turns: int):
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.max_turns = max_turns
        self.task: Task | None = None
        self.turns = 0

    @abstractmethod
    def prompt(self, task: Task) -> str:
        """The prompt that opens an episode of `task`."""

    @abstractmethod
    def tool(self, argument: str) -> str:
        """The tool's answer to an action's argument (the observation's content)."""

    @abstractmethod
    def score(self, answer: str) -> tuple[float, bool, dict]:
        """(reward, success, extra info) of a final answer."""

    def reset(self, task: Task) -> str:
        if task.type != self.task_type:
            raise ValueError(f"task {task.id} is a {task.type!r} task; this environment plays "
                             f"{self.task_type!r} tasks")
        self.task, self.turns = task, 0
        return self.prompt(task)

    def step(self, agent_text: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("step() before reset()")
        self.turns += 1
        action = parse_action(agent_text, allowed=(*self.tools, ANSWER))
        if isinstance(action, Action) and action.kind == ANSWER:
            reward, success, info = self.score(action.argument)
            self.task = None
            return StepResult(None, True, reward, {"success": success, "answer": action.argument,
                                                   **info})
        if self.turns >= self.max_turns:
            self.task = None
            return StepResult(None, True, 0.0, {"success": False, "reason": "max_turns"})
        if isinstance(action, FormatError):
            return StepResult(self.observe(f"invalid turn, {action}"), False, 0.0,
                              {"format_error": str(action)})
        return StepResult(self.observe(self.tool(action.argument)), False, 0.0)

    def observe(self, content: str) -> str:
        return f"<{self.observation_tag}>{content}</{self.observation_tag}>"
