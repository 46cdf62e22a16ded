"""A toy environment registered from outside the package, as a user adds one: unit conversion.
The agent converts with <convert> 3 km to m </convert>, the result comes back in
<conversion> ... </conversion>, and the final <answer> is compared as a number. This module and
its one `register` call are all it takes; a recipe names the module in `extensions`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_foresight.configtree import check
from megatron_foresight.tasks import Task
from megatron_foresight.envs.base import Episode
from megatron_foresight.envs.registry import EnvSpec, register
from megatron_foresight.envs.verify import numbers_match

METRES = {"km": 1000.0, "m": 1.0, "cm": 0.01, "mile": 1609.344}
_QUERY = re.compile(r"([\d.]+)\s*(\w+)\s+to\s+(\w+)")


class ConvertEnv(Episode):
    task_type = "convert"
    tools = ("convert",)
    observation_tag = "conversion"

    def __init__(self, max_turns: int = 4):
        super().__init__(max_turns)

    def prompt(self, task: Task) -> str:
        return (f"Convert with <convert> 3 km to m </convert>; answer with <answer> number "
                f"</answer>.\nProblem: {task.question}")

    def tool(self, argument: str) -> str:
        m = _QUERY.fullmatch(argument.strip())
        if m is None or m[2] not in METRES or m[3] not in METRES:
            return f"error: write '<number> <unit> to <unit>' with units {', '.join(METRES)}"
        return f"{float(m[1]) * METRES[m[2]] / METRES[m[3]]:g} {m[3]}"

    def score(self, answer: str) -> tuple[float, bool, dict]:
        ok = any(numbers_match(answer, ref) for ref in self.task.answers)
        return float(ok), ok, {}


@dataclass
class ConvertOptions:
    """Unit conversion."""

    max_turns: int = 4
    """Agent turns before the episode ends without an answer."""

    def __post_init__(self):
        check(self.max_turns >= 1, "max_turns", "must be at least 1")


SPEC = register(EnvSpec(name="convert", episode=ConvertEnv, options=ConvertOptions,
                        make=lambda options, ctx: lambda: ConvertEnv(options.max_turns),
                        description="unit conversion (a test's toy environment)"))
