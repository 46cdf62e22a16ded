"""The environments and the scripted agents: the action grammar, search over the built-in
corpus, the math tools, expert noise and Monte-Carlo estimates."""

import math
import random

import pytest

from megatron_foresight.tasks import Document, Task
from megatron_foresight.envs.math import MathEnv
from megatron_foresight.envs.retriever import BM25Retriever
from megatron_foresight.envs.search import SearchEnv
from megatron_foresight.foresight.action import Action, FormatError, parse_action
from megatron_foresight.world.agents import MathExpert, mc_success, play
from megatron_foresight.world.build import World
from megatron_foresight.world.sizes import WorldSizes

SMALL = WorldSizes(cities=40, people=120, guilds=20, search_tasks=600, math_tasks=600,
                   trajectories=40, validation_trajectories=10, mc_samples=4, vocab_size=0)


@pytest.fixture(scope="module")
def world():
    return World(7, SMALL)


def test_parse_action_reads_the_one_action_outside_reasoning():
    text = "<think>maybe <search>x</search> later</think>\n<foresight><plan><answer>no</answer>" \
           "</plan></foresight><search> capital of Kalo </search>"
    action = parse_action(text)
    assert action == Action("search", "capital of Kalo", text.index("<search> capital"))


@pytest.mark.parametrize("text, message, offset", [
    ("I think it is 4", "no action", 15),
    ("<search>a</search><answer>b</answer>", "more than one action", 18),
    ("<calc>1+1</calc>", "not available here", 0),
    ("<answer>4", "never closed", 0),
    ("<answer>  </answer>", "is empty", 0),
    ("<think>unclosed <answer>4</answer>", "no action", 34),
])
def test_parse_action_errors_say_what_and_where(text, message, offset):
    error = parse_action(text, allowed=("search", "answer"))
    assert isinstance(error, FormatError)
    assert message in error.message and error.offset == offset


def test_search_env_returns_passages_and_scores_answers():
    docs = [Document("a", "Kalo", "Kalo is a city in the region of Mirten."),
            Document("b", "Vasru", "Vasru trades in salt.")]
    env = SearchEnv(BM25Retriever.from_documents(docs), top_k=2, max_turns=3)
    task = Task("t", "search", "In which region is Kalo?", ("Mirten",), None)
    assert "Question: In which region is Kalo?" in env.reset(task)
    step = env.step("<search>Kalo region</search>")
    assert not step.done and step.observation.startswith("<information>Doc 1 (Title: Kalo)")
    assert "Vasru" not in step.observation  # shares no term with the query
    step = env.step("<think>easy</think><answer>the Mirten</answer>")
    assert step.done and step.reward == 1.0 and step.info["success"]
    env.reset(task)
    bad = env.step("<calc>1+1</calc>")
    assert not bad.done and "not available here" in bad.observation and "format_error" in bad.info
    env.step("<search>salt</search>")
    last = env.step("<search>again</search>")
    assert last.done and last.reward == 0.0 and last.info["reason"] == "max_turns"


def test_math_env_calculates_and_verifies():
    env = MathEnv(max_turns=4)
    env.reset(Task("m", "math", "What is half of one?", ("1/2",), None))
    assert env.step("<calc>3 * (2 + 5)</calc>").observation == "<result>21</result>"
    assert env.step("<calc>__import__('os')</calc>").observation.startswith("<result>error:")
    assert env.step("<answer>0.5</answer>").reward == 1.0
    env.reset(Task("m", "math", "?", ("7",), None))
    assert env.step("<answer>8</answer>").reward == 0.0


def test_bm25_finds_the_gold_document_of_one_hop_questions(world):
    one_hop = [t for t in world.splits["search"]["train"] if len(t.meta["hops"]) == 1]
    assert len(one_hop) > 100
    hits = [t.meta["hops"][0]["doc"] in {d.id for d, _ in world.retriever.search(t.question, 3)}
            for t in one_hop]
    rate = sum(hits) / len(hits)
    print(f"gold document in top 3 for {len(hits)} one-hop questions: {rate:.3f}")
    assert rate >= 0.95


@pytest.mark.parametrize("task_type", ["search", "math"])
def test_expert_success_falls_as_noise_rises(world, task_type):
    tasks = world.splits[task_type]["train"][:120]
    rates = []
    for noise in (0.0, 0.2, 0.5):
        agent = world.expert(task_type, noise)
        wins = [play(world.env(task_type), agent, t, random.Random(f"{noise}/{i}")).success
                for i, t in enumerate(tasks)]
        rates.append(sum(wins) / len(wins))
    print(task_type, rates)
    assert rates[0] >= 0.95 and rates[0] > rates[1] > rates[2]


def _wilson(wins: int, n: int, z: float = 2.576) -> tuple[float, float]:
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_monte_carlo_estimate_covers_the_known_success_rate(world):
    # Every noisy decision of the math expert (a miscopied operand, a wrong final answer) makes
    # the episode fail, and every clean one keeps it on track, so from a state with k decisions
    # left the success probability is (1 - noise) ** k.
    noise, n = 0.3, 400
    task = next(t for t in world.splits["math"]["train"] if len(t.meta["steps"]) == 2)
    agent = MathExpert(noise)
    env = world.env("math")
    env.reset(task)
    start = mc_success(env, agent, task, [], n, "mc-test/start")
    low, high = _wilson(start, n)
    assert low <= (1 - noise) ** 3 <= high, (start / n, (1 - noise) ** 3)
    clean = play(world.env("math"), MathExpert(0.0), task, random.Random(0), keep_snapshots=True)
    after_one = mc_success(clean.snapshots[1], agent, task, clean.history[:1], n, "mc-test/one")
    low, high = _wilson(after_one, n)
    assert low <= (1 - noise) ** 2 <= high, (after_one / n, (1 - noise) ** 2)
