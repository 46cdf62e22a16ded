"""Scripted agents for the built-in world: experts that follow a task's recorded path, each
decision going wrong with probability `noise`. They are stateless (an action is a function of
the task, the turns so far and a random generator), so an episode can be continued from any of
its states: that is how the Monte-Carlo success estimates of intermediate states are made.

They read what the environment returned rather than trusting the path: a search expert moves to
the next hop only once the passage it needs came back, and a math expert computes its next step
from the calculator's last result, so a mistake carries through to the outcome."""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction

from megatron_foresight.tasks import Task
from megatron_foresight.envs.base import Episode
from megatron_foresight.foresight.action import Action, parse_action, render_action
from megatron_foresight.foresight.tags import ANSWER, CALC, SEARCH, THINK, wrap

ATTRIBUTE_WORDS = {"region": "region", "founded": "founded year", "trade": "trade",
                   "born_in": "born in city", "profession": "profession", "seat": "seat city",
                   "founder": "founded by", "craft": "makes craft", "population": "population",
                   "born": "born year", "road_to": "road leads to"}

History = list[tuple[str, "str | None"]]


def _turn(thought: str, tag: str, argument: str) -> str:
    return f"{wrap(THINK, thought)}\n{render_action(tag, argument)}"


def _stating_line(observation: str | None, entity: str, value: str) -> str | None:
    """The line of the passage titled `entity` (as `search.format_passages` lists it) if it
    came back and states `value`; None otherwise."""
    if observation is None:
        return None
    return next((line for line in observation.splitlines()
                 if f"(Title: {entity})" in line and value in line), None)


def _quote(line: str, entity: str, value: str) -> str | None:
    """The sentence of a passage's line (`_stating_line`) that states `value`, whole; None if
    none does. Experts quote it before they use the value, so that a model imitating them copies
    the passage's own words up to the value, then the value after them."""
    text = line.split(f"(Title: {entity}) ", 1)[-1]
    return next((sentence for sentence in re.split(r"(?<=\.) ", text)
                 if sentence.endswith(".") and
                 re.search(rf"(?<!\w){re.escape(value)}(?!\w)", sentence)), None)


def _number_in_context(question: str, number: str) -> str:
    """`number` where it first appears in `question`, with up to two words before it and one
    after, within its sentence ("equally among 12 shops"); the number alone if it is not
    there. A math expert names where each number of a step comes from."""
    found = re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", question)
    if not found:
        return number
    before = re.split(r"[.?!]\s", question[:found.start()])[-1].split()[-2:]
    after = question[found.end():].split()[:1]
    after = [w.rstrip(".,?!") for w in after if w.rstrip(".,?!") and w[0].isalpha()]
    return " ".join([*before, number, *after])


class SearchExpert:
    """Searches for each hop's entity, reads the value off the returned passage, answers."""

    def __init__(self, noise: float, entity_names: list[str],
                 values_by_attribute: dict[str, list[str]], max_tries: int = 2):
        self.noise, self.max_tries = noise, max_tries
        self.entity_names = entity_names
        self.values_by_attribute = values_by_attribute

    def _progress(self, task: Task, history: History) -> tuple[int, int, str | None]:
        """Hops done, failed searches for the next one, and the sentence that gave the last
        hop's value (None before the first)."""
        hops, hop, tries, said = task.meta["hops"], 0, 0, None
        for agent_text, observation in history:
            action = parse_action(agent_text)
            if not isinstance(action, Action) or action.kind != SEARCH or hop == len(hops):
                continue
            entity, value = hops[hop]["entity"], hops[hop]["value"]
            line = _stating_line(observation, entity, value)
            if entity in action.argument and line:
                said = _quote(line, entity, value)
                hop, tries = hop + 1, 0
            else:
                tries += 1
        return hop, tries, said

    def _wrong(self, attribute: str, right: str, rng: random.Random) -> str:
        return rng.choice([v for v in self.values_by_attribute[attribute] if v != right])

    def act(self, task: Task, history: History, rng: random.Random) -> str:
        hops = task.meta["hops"]
        hop, tries, said = self._progress(task, history)
        # what the last passage read said, in its words: the value comes right after them
        read = f"The passage on {hops[hop - 1]['entity']} says: {said} " if said else ""
        if hop == len(hops) or tries >= self.max_tries:
            final = hops[-1]
            answer = final["value"] if hop == len(hops) else self._wrong(
                final["attribute"], final["value"], rng)
            if rng.random() < self.noise:
                answer = self._wrong(final["attribute"], final["value"], rng)
            thought = f"{read}The answer is {answer}." if hop == len(hops) and said else \
                f"The passages point to {answer}."
            return _turn(thought, ANSWER, answer)
        entity, words = hops[hop]["entity"], ATTRIBUTE_WORDS[hops[hop]["attribute"]]
        thought = (f"I need the {words} of {entity}." if hop == 0 else
                   f"{read}Now I need the {words} of {entity}.")
        if rng.random() < self.noise:
            entity = rng.choice([n for n in self.entity_names if n != entity])
        query = entity if tries else f"{entity} {words}"
        return _turn(thought, SEARCH, query)


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        return None


def _show(value) -> str:
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.12g}"


class MathExpert:
    """Computes each recorded step with the calculator, on the values the calculator returned."""

    def __init__(self, noise: float):
        self.noise = noise

    def act(self, task: Task, history: History, rng: random.Random) -> str:
        results = []
        for agent_text, observation in history:
            action = parse_action(agent_text)
            if isinstance(action, Action) and action.kind == CALC and observation:
                value = _number(observation.removeprefix("<result>").removesuffix("</result>"))
                if value is not None:
                    results.append(value)
        steps = task.meta["steps"]
        if len(results) == len(steps):
            answer = results[-1]
            if rng.random() < self.noise:
                answer += rng.choice([-1, 1]) * rng.randint(1, 9)
            return _turn("That is the last step.", ANSWER, _show(answer))
        op, *args = steps[len(results)]
        operands = [results[int(a[1:])] if isinstance(a, str) else Fraction(a) for a in args]
        if rng.random() < self.noise:
            # Miscopy a number from the problem (one of the literal operands).
            i = rng.choice([i for i, a in enumerate(args) if not isinstance(a, str)])
            delta = rng.choice([d for d in range(-9, 10) if d and operands[i] + d > 0])
            operands[i] += delta
        expression = f"{_show(operands[0])} {op} {_show(operands[1])}"
        # where the problem's numbers of this step are, in its words (the true numbers, also
        # when this step miscopies one)
        where = ", ".join(_number_in_context(task.question, _show(a)) for a in args
                          if not isinstance(a, str))
        return _turn(f"Step {len(results) + 1}: {where + ', so ' if where else ''}"
                     f"{expression}.", CALC, expression)


@dataclass
class Played:
    prompt: str
    history: History
    success: bool
    reward: float
    answer: str | None
    snapshots: list = field(default_factory=list)
    """The environment before each agent turn (for continuing from that state)."""


def play(env: Episode, agent, task: Task, rng: random.Random, *, history: History | None = None,
         prompt: str | None = None, keep_snapshots: bool = False) -> Played:
    """An episode to its end: from the start (`env` fresh), or from `history` (`env` in the
    state after it)."""
    if history is None:
        prompt, history = env.reset(task), []
    history = list(history)
    snapshots = []
    while True:
        if keep_snapshots:
            snapshots.append(copy.copy(env))
        text = agent.act(task, history, rng)
        result = env.step(text)
        history.append((text, result.observation))
        if result.done:
            return Played(prompt, history, bool(result.info["success"]), result.reward,
                          result.info.get("answer"), snapshots)


def mc_success(env_at_state: Episode, agent, task: Task, history: History, n: int,
               seed: str) -> int:
    """How many of `n` continuations from the state after `history` succeed."""
    wins = 0
    for j in range(n):
        played = play(copy.copy(env_at_state), agent, task, random.Random(f"{seed}/{j}"),
                      history=history)
        wins += played.success
    return wins
