"""The math environment: the agent may compute with <calc> (a safe arithmetic evaluator; the
value or the error comes back in <result>) and ends with <answer>, verified symbolically
against the reference answers. Registered as `math`; its task-set options are `MathOptions`."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_foresight.configtree import check
from megatron_foresight.tasks import Task
from megatron_foresight.envs.base import Episode, PromptOptions, load_prompt_template
from megatron_foresight.envs.calculator import CalcError, evaluate
from megatron_foresight.envs.registry import EnvContext, EnvSpec, register
from megatron_foresight.envs.verify import answers_match, numbers_match
from megatron_foresight.foresight.tags import CALC, RESULT

PROMPT = load_prompt_template(None, "math")
"""The default instruction (prompts/math.txt); a task set's `prompt_template` replaces it."""


class MathEnv(Episode):
    task_type = "math"
    tools = (CALC,)
    observation_tag = RESULT

    def __init__(self, max_turns: int = 8, symbolic: bool = True, template: str = PROMPT):
        super().__init__(max_turns)
        self.symbolic, self.template = symbolic, template

    def prompt(self, task: Task) -> str:
        return self.template.format(question=task.question)

    def tool(self, expression: str) -> str:
        try:
            return evaluate(expression)
        except CalcError as e:
            return f"error: {e}"

    def score(self, answer: str) -> tuple[float, bool, dict]:
        same = answers_match if self.symbolic else numbers_match
        ok = any(same(answer, ref) for ref in self.task.answers)
        return float(ok), ok, {}


@dataclass
class MathOptions(PromptOptions):
    """A calculator and a verifier of final answers."""

    max_turns: int = 8
    """Agent turns before the episode ends without an answer."""
    symbolic: bool = True
    """Verify answers that are not plain numbers with math-verify (LaTeX, expressions, sets:
    MATH); false compares plain numbers only (GSM8K), where a non-number answer is wrong."""

    def __post_init__(self):
        check(self.max_turns >= 1, "max_turns", "must be at least 1")


def check_files(options: MathOptions) -> None:
    """The prompt template reads."""
    load_prompt_template(options.prompt_template, "math")


def make_math(options: MathOptions, ctx: EnvContext):
    template = load_prompt_template(options.prompt_template, "math")
    return lambda: MathEnv(options.max_turns, options.symbolic, template)


SPEC = register(EnvSpec(
    name="math", episode=MathEnv, options=MathOptions, make=make_math, check=check_files,
    description="problems with a calculator tool and a symbolic verifier (accuracy)"))
