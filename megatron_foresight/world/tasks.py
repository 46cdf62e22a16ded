"""Tasks over the built-in world: 1-hop and 2-hop questions for the search environment (each
answerable from the corpus, the documents on its path recorded), and multi-step arithmetic word
problems for the math environment (their calculation steps recorded). The recorded paths are
what the scripted agents follow; a model never sees them."""

from __future__ import annotations

import random

from megatron_foresight.tasks import Task
from megatron_foresight.errors import UsageError
from megatron_foresight.world.kb import KnowledgeBase
from megatron_foresight.world.templates import ONE_HOP, TWO_HOP

def _hop(entity, attribute: str) -> dict:
    return {"entity": entity.name, "doc": entity.id, "attribute": attribute,
            "value": str(entity.attrs[attribute])}


def search_questions(kb: KnowledgeBase, rng: random.Random, n: int,
                     multi_hop_fraction: float = 0.5) -> list[Task]:
    names = kb.by_name()
    questions: dict[str, Task] = {}
    attempts = 0
    while len(questions) < n and attempts < 50 * n:
        attempts += 1
        if rng.random() < multi_hop_fraction:
            (kind, bridge, attribute), template = rng.choice(sorted(TWO_HOP.items()))
            start = rng.choice(kb.of_kind(kind))
            middle = names[start.attrs[bridge]]
            hops = [_hop(start, bridge), _hop(middle, attribute)]
            text = template.format(name=start.name)
        else:
            (kind, attribute), templates = rng.choice(sorted(ONE_HOP.items()))
            start = rng.choice(kb.of_kind(kind))
            hops = [_hop(start, attribute)]
            text = rng.choice(templates).format(name=start.name)
        if text not in questions:
            questions[text] = Task(f"search-{len(questions)}", "search", text,
                                   (hops[-1]["value"],), {"hops": hops})
    if len(questions) < n:
        raise UsageError(f"the world has only {len(questions)} distinct questions; ask for fewer "
                         f"--search-tasks or a larger world (more --cities, --people, --guilds)")
    return list(questions.values())


def _gain(rng, city, guild):
    a, b = rng.randint(3, 40), rng.randint(2, 30)
    c = a * b + rng.randint(5, 500)
    return (f"A merchant from {city.name} buys {a} crates of {city.attrs['trade']} at {b} coins "
            f"each and sells them all for {c} coins. How many coins does the merchant gain?",
            [["*", a, b], ["-", c, "$0"]])


def _share(rng, city, guild):
    n, q = rng.randint(2, 12), rng.randint(3, 60)
    a = rng.randint(1, n * q - 1)
    return (f"The {guild.name} makes {a} {guild.attrs['craft']} in the morning and {n * q - a} "
            f"in the afternoon, and shares them equally among {n} shops. How many does each "
            f"shop get?", [["+", a, n * q - a], ["/", "$0", n]])


def _growth(rng, city, guild):
    p, k, y = city.attrs["population"], rng.randint(5, 400), rng.randint(2, 30)
    return (f"{city.name} has {p} people and grows by {k} people each year. How many people "
            f"live there after {y} years?", [["*", k, y], ["+", p, "$0"]])


def _caravan(rng, city, guild):
    a, d, b = rng.randint(12, 60), rng.randint(2, 20), rng.randint(1, 99)
    return (f"A caravan from {city.name} to {city.attrs['road_to']} travels {a} km a day for "
            f"{d} days and then {b} km more. How far does it travel in km?",
            [["*", a, d], ["+", "$0", b]])


def _dues(rng, city, guild):
    a, b, m = rng.randint(5, 80), rng.randint(2, 15), rng.randint(2, 12)
    c = rng.randint(1, a * b * m - 1)
    return (f"The {guild.name} has {a} members who each pay {b} coins a month. After {m} months "
            f"it spends {c} coins on {guild.attrs['craft']}. How many coins are left?",
            [["*", a, b], ["*", "$0", m], ["-", "$1", c]])


def _jars(rng, city, guild):
    a, b, n = rng.randint(3, 30), rng.randint(4, 24), rng.randint(2, 9)
    q = rng.randint(1, (a * b - 1) // n)
    c = a * b - n * q
    return (f"{a} crates of {city.attrs['trade']} each hold {b} jars. {c} jars break on the "
            f"road, and the rest are shared equally among {n} markets. How many jars does each "
            f"market get?", [["*", a, b], ["-", "$0", c], ["/", "$1", n]])


WORD_PROBLEMS = (_gain, _share, _growth, _caravan, _dues, _jars)
STEPS = {_gain: 2, _share: 2, _growth: 2, _caravan: 2, _dues: 3, _jars: 3}
"""Calculator steps each kind of word problem takes."""


def run_steps(steps: list) -> list[int]:
    """The value of each step; `$i` names the value of step i."""
    values: list[int] = []
    for op, *args in steps:
        a, b = (values[int(x[1:])] if isinstance(x, str) else x for x in args)
        values.append({"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op])
        if op == "/":
            assert a % b == 0, (a, b)
    return values


def math_problems(kb: KnowledgeBase, rng: random.Random, n: int,
                  max_steps: int = 3) -> list[Task]:
    cities, guilds = kb.of_kind("city"), kb.of_kind("guild")
    kinds = tuple(make for make in WORD_PROBLEMS if STEPS[make] <= max_steps)
    problems: dict[str, Task] = {}
    attempts = 0
    while len(problems) < n and attempts < 50 * n:
        attempts += 1
        make = rng.choice(kinds)
        text, steps = make(rng, rng.choice(cities), rng.choice(guilds))
        if text not in problems:
            answer = run_steps(steps)[-1]
            problems[text] = Task(f"math-{len(problems)}", "math", text, (str(answer),),
                                  {"steps": steps})
    if len(problems) < n:
        raise UsageError(f"only {len(problems)} distinct word problems came out; ask for fewer "
                         "--math-tasks or a larger world (more --cities, --guilds)")
    return list(problems.values())


def split(tasks: list[Task], rng: random.Random, fractions=(0.8, 0.1, 0.1)) -> dict:
    """Disjoint train / validation / test lists (tasks are distinct by question)."""
    order = list(tasks)
    rng.shuffle(order)
    n_train = round(len(order) * fractions[0])
    n_valid = round(len(order) * fractions[1])
    return {"train": order[:n_train], "validation": order[n_train:n_train + n_valid],
            "test": order[n_train + n_valid:]}
