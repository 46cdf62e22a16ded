"""WM-AMT and FE-SFT data: renderers, hindsight traces, and the loss masks, checked by decoding
exactly the tokens that carry loss, on a small built world with its real tokenizer."""

from collections import Counter

import numpy as np
import pytest
import torch

from megatron_foresight.data.tokenizer import TokenizerConfig
from megatron_foresight.data.preprocess import SEGMENTS_SUFFIX, preprocess
from megatron_foresight.data.render import get_renderer
from megatron_foresight.data.segmented import segment_weight_table
from megatron_foresight.data.tokenizer import SentencePieceTokenizer
from megatron_foresight.data.trajectory import (
    MCEstimate, Outcome, Trajectory, Turn, read_trajectories, write_jsonl,
)
from megatron_foresight.foresight.format import FORESIGHT_INSTRUCTION, AgentTurn, parse_turn
from megatron_foresight.world.build import build_world
from megatron_foresight.world.sizes import WorldSizes
from plugins.fe_sft import Config as FESFTConfig
from plugins.fe_sft.hindsight import foresight_trace, plan_text
from plugins.wm_amt import Config as WMAMTConfig
from plugins.wm_amt.plugin import OUTCOME

SIZES = WorldSizes(cities=30, people=80, guilds=12, search_tasks=300, math_tasks=300,
                   trajectories=60, validation_trajectories=12, mc_samples=3, vocab_size=1024)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage-world")
    build_world(out, seed=5, sizes=SIZES, progress=False)
    return out


def _tokens_with_loss(tmp_path, world, trajectory, renderer, weights):
    """Preprocess one trajectory as training does; decode the tokens whose weight is > 0."""
    src = tmp_path / "one.jsonl"
    write_jsonl([trajectory], src)
    tok_cfg = TokenizerConfig("sentencepiece", str(world / "tokenizer" / "spm.model"))
    preprocess([src], tmp_path / "idx", renderer, tok_cfg, progress=False)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # copies: the arrays are views into memory maps that close with their datasets
    ids_ds, seg_ds = (IndexedDataset(str(tmp_path / "idx") + s) for s in ("", SEGMENTS_SUFFIX))
    ids, segments = np.array(ids_ds[0]), np.array(seg_ds[0])
    weight = segment_weight_table(weights)[torch.from_numpy(segments.astype(np.int64))]
    tok = SentencePieceTokenizer(tok_cfg.path)
    return tok.decode(ids[weight.numpy() > 0].tolist()), tok.decode(ids.tolist())


def _first(world, task_type, split="train"):
    return next(t for t in read_trajectories(world / "trajectories" / f"{split}.jsonl")
                if t.task_type == task_type and len(t.turns) >= 3)


@pytest.mark.parametrize("task_type", ["search", "math"])
def test_wm_amt_loss_is_on_observations_and_outcome_exactly(tmp_path, world, task_type):
    t = _first(world, task_type)
    carried, whole = _tokens_with_loss(tmp_path, world, t, "wm_amt",
                                       WMAMTConfig().segment_weights)
    observations = "".join(turn.text + "\n" for turn in t.turns if turn.role == "env")
    assert carried == observations + OUTCOME[t.outcome.success]
    assert t.prompt in whole and t.prompt not in carried
    assert all(turn.text not in carried for turn in t.turns if turn.role == "agent")


def test_wm_amt_action_weight_adds_exactly_the_agent_turns(tmp_path, world):
    t = _first(world, "search")
    carried, _ = _tokens_with_loss(tmp_path, world, t, "wm_amt", {"action": 1.0, "think": 1.0})
    assert carried == "".join(turn.text + "\n" for turn in t.turns if turn.role == "agent")


@pytest.mark.parametrize("task_type", ["search", "math"])
def test_fe_sft_loss_is_on_agent_turns_exactly(tmp_path, world, task_type):
    original = _first(world, task_type)
    trace = foresight_trace(original)
    assert trace.prompt == FORESIGHT_INSTRUCTION + "\n" + original.prompt  # asks for foresight
    carried, whole = _tokens_with_loss(tmp_path, world, trace, "transcript",
                                       FESFTConfig().segment_weights)
    agent = [turn.text for turn in trace.turns if turn.role == "agent"]
    assert carried == "".join(text + "\n" for text in agent)
    assert all("<foresight>" in text for text in agent)
    assert all(turn.text not in carried for turn in trace.turns if turn.role == "env")
    assert trace.prompt in whole and trace.prompt not in carried


def test_fe_sft_rollout_only_weight_decodes_to_the_rollout_blocks(tmp_path, world):
    trace = foresight_trace(_first(world, "search"))
    carried, _ = _tokens_with_loss(tmp_path, world, trace, "transcript", {"rollout": 1.0})
    turns = [parse_turn(turn.text) for turn in trace.turns if turn.role == "agent"]
    assert carried == "".join(f"<rollout>{t.foresight.rollout}</rollout>" for t in turns)


def _trajectory(turns, success, mc):
    return Trajectory("t1", "task-1", "search", "Question: Where?",
                      tuple(Turn(r, x) for r, x in turns), Outcome(success, float(success), "x"),
                      tuple(MCEstimate(k, n, s) for k, n, s in mc))


def test_hindsight_rollout_is_the_next_observation_and_value_the_mc_estimate():
    t = _trajectory([("agent", "<think>a</think>\n<search>q one</search>"),
                     ("env", "<information>Doc 1 (Title: A) alpha.</information>"),
                     ("agent", "<search>q two</search>"),
                     ("env", "<information>Doc 1 (Title: B) beta.</information>"),
                     ("agent", "<answer>x</answer>")], False, [(0, 3, 2), (1, 6, 1), (2, 7, 0)])
    tally = Counter()
    trace = foresight_trace(t, tally)
    parsed = [parse_turn(turn.text) for turn in trace.turns if turn.role == "agent"]
    assert all(isinstance(p, AgentTurn) for p in parsed)
    assert [p.foresight.rollout for p in parsed] == [
        "Doc 1 (Title: A) alpha.", "Doc 1 (Title: B) beta.", "The answer is wrong."]
    assert [p.foresight.value for p in parsed] == [0.67, 0.17, 0.0]
    assert parsed[0].foresight.plan == 'Search for q one, then 1 more search, then answer.'
    assert parsed[0].think == "a" and parsed[2].action.argument == "x"
    assert [turn.text for turn in trace.turns if turn.role == "env"] == \
        [turn.text for turn in t.turns if turn.role == "env"]
    assert tally == Counter({"turns with foresight": 3, "trajectories": 1})


def test_hindsight_keeps_malformed_turns_and_fills_missing_values_from_the_outcome():
    t = _trajectory([("agent", "<search>q</search> trailing words"),
                     ("env", "<information>invalid turn</information>"),
                     ("agent", "<answer>x</answer>")], True, [])
    tally = Counter()
    trace = foresight_trace(t, tally)
    assert trace.turns[0] == t.turns[0]
    last = parse_turn(trace.turns[2].text)
    assert last.foresight.value == 1.0 and last.foresight.rollout == "The answer is correct."
    assert tally["turns kept unchanged"] == 1
    assert tally["values from the outcome (no MC estimate)"] == 1


def test_plan_names_the_action_and_counts_what_follows():
    from megatron_foresight.foresight.action import Action

    acts = [Action("calc", "2 * 3", 0), Action("calc", "6 + 1", 0), Action("calc", "7 / 7", 0),
            Action("answer", "1", 0)]
    assert plan_text(acts, 0) == "Compute 2 * 3, then 2 more calculations, then answer."
    assert plan_text(acts, 3) == "Answer 1."
    assert plan_text(acts, 0, ahead=False) == "Compute 2 * 3."  # fe_sft.plan_ahead: false


def test_plans_without_what_followed_are_cached_apart(tmp_path):
    """`fe_sft.plan_ahead: false` renders the same trajectories with plans of the action only,
    into a cache file of its own (a shared cache never serves one recipe the other's plans)."""
    from plugins.fe_sft.plugin import cached_foresight_traces

    t = _trajectory([("agent", "<search>q one</search>"),
                     ("env", "<information>Doc 1 (Title: A) alpha.</information>"),
                     ("agent", "<answer>x</answer>")], True, [])
    source = tmp_path / "t.jsonl"
    write_jsonl([t], source)
    ahead = cached_foresight_traces(source, tmp_path / "cache")
    only = cached_foresight_traces(source, tmp_path / "cache", plan_ahead=False)
    assert ahead != only
    plans = [[parse_turn(turn.text).foresight.plan for turn in x.turns if turn.role == "agent"]
             for x in (next(read_trajectories(ahead)), next(read_trajectories(only)))]
    assert plans == [["Search for q one, then answer.", "Answer x."],
                     ["Search for q one.", "Answer x."]]


def test_wm_amt_renderer_is_found_by_its_stage_name():
    assert get_renderer("wm_amt").__module__ == "plugins.wm_amt.plugin"


def test_agent_loop_keeps_sampled_ids_and_appends_each_observation_once(world, megatron_cpu,
                                                                        tmp_path):
    """Token in, token out, on the real Megatron model (random weights) and environments."""
    from megatron_foresight.config import load_recipe
    from megatron_foresight.inference.agent import run_episodes
    from megatron_foresight.inference.generate import Generator, Sampling
    from megatron_foresight.models.provider import build_model
    from helpers.run import REPO, world_task_sets

    tok = SentencePieceTokenizer(str(world / "tokenizer" / "spm.model"))
    (model,) = build_model(load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml"), 1024)
    envs = world_task_sets(world, tmp_path)
    tasks = envs.tasks("validation", 2)
    records = run_episodes(Generator(model.eval(), tok, max_sequence_length=512), tasks,
                           envs.make_env, Sampling(temperature=1.0, max_new_tokens=6, seed=1),
                           progress=False)
    nl = tok.encode("\n")
    for task, r in zip(tasks, records):
        assert r.task is task and r.ended in ("max_turns", "answer", "context")
        assert r.prompt.startswith(FORESIGHT_INSTRUCTION + "\n")  # as FE-SFT's traces
        expected = tok.encode(r.prompt) + nl
        for turn in r.turns:
            assert turn.text == tok.decode(turn.ids) and len(turn.logprobs) == len(turn.ids)
            assert turn.start == len(expected)
            expected += turn.ids + nl
            if turn.observation is not None:
                expected += tok.encode(turn.observation) + nl
        assert r.ids == expected


def test_episode_scores_against_hand_computed_values():
    from megatron_foresight.tasks import Task
    from megatron_foresight.eval.agent_eval import score_episodes
    from megatron_foresight.inference.agent import AgentTurnRecord, EpisodeRecord

    good = ("<foresight>\n<plan>p</plan>\n<rollout>Doc 1 (Title: Olgar) x</rollout>\n"
            "<value>0.80</value>\n</foresight>\n<search>Olgar</search>")
    answer = ("<foresight>\n<plan>p</plan>\n<rollout>The answer is correct.</rollout>\n"
              "<value>0.60</value>\n</foresight>\n<answer>1234</answer>")
    task = Task("s1", "search", "When?", ("1234",), {"hops": [{"entity": "Olgar"}]})
    won = EpisodeRecord(task, "p", [
        AgentTurnRecord(good, [], [], "<information>Doc 1 (Title: Olgar) x</information>", "stop"),
        AgentTurnRecord(answer, [], [], None, "stop")], success=True, ended="answer")
    lost = EpisodeRecord(task, "p", [
        AgentTurnRecord("<search>Olgar</search>", [], [], "<information>y</information>", "stop"),
        AgentTurnRecord(answer.replace("0.60", "0.40"), [], [], None, "stop")],
        success=False, ended="answer")
    s = score_episodes([won, lost])
    assert s["task_success"] == 0.5
    assert s["format_validity"] == 0.75  # the bare <search> turn has no foresight block
    assert s["turns_with_foresight"] == 0.75
    # fidelity: 1 (exact passage), 1 ("correct" predicted, correct), and "answer is correct"
    # against "answer is wrong" (QA normalization drops "the" and the stop): F1 = 2/3
    assert s["rollout_fidelity"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert s["rollout_names_gold"] == 1.0
    # values 0.8, 0.6 (success) and 0.4 (failure)
    assert s["value_brier"] == pytest.approx((0.2 ** 2 + 0.4 ** 2 + 0.4 ** 2) / 3)
    assert s["value_auroc"] == 1.0
