"""The math environment: the agent may compute with <calc> (a safe arithmetic evaluator; the
value or the error comes back in <result>) and ends with <answer>, verified symbolically
against the reference answers."""

from __future__ import annotations

from megatron_foresight.data.tasks import Task
from megatron_foresight.envs.base import Episode
from megatron_foresight.envs.calculator import CalcError, evaluate
from megatron_foresight.envs.verify import answers_match
from megatron_foresight.foresight.tags import CALC, RESULT

PROMPT = ("Solve the problem. You can use a calculator: write <calc> expression </calc> "
          "(numbers, + - * / ^, parentheses) and the value comes back between <result> and "
          "</result>. Give the final answer as <answer> ... </answer>.\n"
          "Problem: {question}")


class MathEnv(Episode):
    task_type = "math"
    tools = (CALC,)
    observation_tag = RESULT

    def __init__(self, max_turns: int = 8):
        super().__init__(max_turns)

    def prompt(self, task: Task) -> str:
        return PROMPT.format(question=task.question)

    def tool(self, expression: str) -> str:
        try:
            return evaluate(expression)
        except CalcError as e:
            return f"error: {e}"

    def score(self, answer: str) -> tuple[float, bool, dict]:
        ok = any(answers_match(answer, ref) for ref in self.task.answers)
        return float(ok), ok, {}
