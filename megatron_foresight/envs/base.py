"""The interface every environment has (`Episode`): `reset` with a task gives the prompt,
`step` with the agent's turn gives the observation, whether the episode is over, and the
reward."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from megatron_foresight.tasks import Task
from megatron_foresight.foresight.action import Action, FormatError, parse_action
from megatron_foresight.foresight.tags import ANSWER


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
