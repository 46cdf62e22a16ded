"""The paper variant (as a secondary summary of arXiv 2606.27483 reports it): the v2 tag set
(render -> parse is the identity, errors say where, the lenient reading never raises, blocks
map onto the segment kinds training weighs), its hindsight traces, its reward terms and the
step_grpo advantages, against hand calculations."""

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.foresight.action import Action, FormatError
from megatron_foresight.foresight.format import AgentTurn, Foresight, segment_turn
from megatron_foresight.foresight.formats import FORMATS
from megatron_foresight.foresight.tags import ACTION_TAGS, V2_TAGS, all_tags
from megatron_foresight.inference.agent import AgentTurnRecord, EpisodeRecord
from megatron_foresight.rl.algorithms import StepGRPO, StepGRPOConfig
from megatron_foresight.rl.rewards import confidence_reward, grounding_reward
from megatron_foresight.rl.rollout import score_rewards, to_sample
from megatron_foresight.tasks import Task

V2 = FORMATS["v2"]
TURN = AgentTurn(Action("search", "Kalo region", 0),
                 Foresight("Search for Kalo.", "Doc 1 (Title: Kalo) Kalo lies in Mirten.", 0.75,
                           ("Kalo", "Mirten")), "I need the region.")


def _no_tag(text: str) -> bool:
    return not any(f"<{t}>" in text or f"</{t}>" in text for t in all_tags())


content = st.text(st.characters(codec="utf-8", exclude_characters="<;,\n"), max_size=40).map(
    str.strip).filter(_no_tag)


@settings(max_examples=200, deadline=None)
@given(st.builds(
    AgentTurn,
    action=st.builds(Action, kind=st.sampled_from(ACTION_TAGS),
                     argument=content.filter(bool), offset=st.just(0)),
    foresight=st.builds(Foresight, plan=content, rollout=content,
                        value=st.integers(0, 100).map(lambda i: i / 100),
                        keywords=st.lists(content.filter(bool), max_size=3).map(tuple)),
    think=st.none() | content))
def test_v2_render_then_parse_is_the_identity(turn):
    text = V2.render_turn(turn)
    parsed = V2.parse_turn(text)
    assert isinstance(parsed, AgentTurn), (text, parsed)
    assert parsed.foresight == turn.foresight and parsed.think == turn.think
    assert (parsed.action.kind, parsed.action.argument) == (turn.action.kind,
                                                             turn.action.argument)
    assert V2.parse_turn_lenient(text).errors == ()


def test_v2_reads_what_the_summary_names():
    text = V2.render_turn(TURN)
    assert text == ("<imaginary>Doc 1 (Title: Kalo) Kalo lies in Mirten.</imaginary>\n"
                    "<keyword>Kalo; Mirten</keyword>\n<analysis>Search for Kalo.</analysis>\n"
                    "<confidence>75%</confidence>\n<think>I need the region.</think>\n"
                    "<action><search> Kalo region </search></action>")
    assert V2.stop_texts() == ("</action>",)
    assert V2.prompt("Question: x").startswith("Before each action, write <imaginary>")
    # each v2 block is the v1 kind training weighs it as; keywords a kind of their own
    kinds = [k for _, k in segment_turn(text) if k != "action"]
    assert kinds == ["rollout", "keyword", "plan", "value", "think"]
    # the v1 parser refuses a v2 turn and the other way round
    assert isinstance(FORMATS["v1"].parse_turn(text), FormatError)
    assert isinstance(V2.parse_turn(FORMATS["v1"].render_turn(TURN)), FormatError)


@pytest.mark.parametrize("broken, words", [
    ("<confidence>75%</confidence>", "expected <imaginary>"),
    ("<imaginary>x</imaginary><keyword>a</keyword><analysis>p</analysis>"
     "<confidence>high</confidence><action><search>q</search></action>",
     "the confidence must be a percentage"),
    ("<imaginary>x</imaginary><keyword>a</keyword><analysis>p</analysis>"
     "<confidence>101%</confidence><action><search>q</search></action>",
     "the confidence must be a percentage"),
    ("<imaginary>x</imaginary><keyword>a</keyword><analysis>p</analysis>"
     "<confidence>5%</confidence><search>q</search>", "expected <action> after the foresight"),
    ("<imaginary>x</imaginary><keyword>a</keyword><analysis>p</analysis>"
     "<confidence>5%</confidence><action><search>q</search>", "expected </action> after"),
])
def test_v2_errors_say_what_and_where(broken, words):
    error = V2.parse_turn(broken)
    assert isinstance(error, FormatError) and words in error.message
    lenient = V2.parse_turn_lenient(broken)
    assert lenient.errors == (error,)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=15) | st.sampled_from(
    [f"<{t}>" for t in V2_TAGS] + [f"</{t}>" for t in V2_TAGS] + ["<search>", "</search>",
                                                                  "75%"]),
    max_size=12).map("".join))
def test_v2_lenient_reading_never_raises(text):
    lenient = V2.parse_turn_lenient(text)
    assert (lenient.errors == ()) == isinstance(V2.parse_turn(text), AgentTurn)
    assert lenient.value is None or 0 <= lenient.value <= 1


def test_confidence_reward_is_i_minus_the_squared_miss():
    assert confidence_reward(0.75, True) == pytest.approx(1 - 0.0625)
    assert confidence_reward(0.75, False) == pytest.approx(0 - 0.5625)
    assert confidence_reward(None, True) == 0.0      # read as the opposite: 1 - 1
    assert confidence_reward(None, False) == -1.0


def test_grounding_reward_counts_keywords_found_later():
    later = ["Doc 1 (Title: Kalo) Kalo lies in Mirten.", "The answer is correct."]
    assert grounding_reward(("Kalo", "mirten"), later) == 1.0
    assert grounding_reward(("Kalo", "Vasru", "correct"), later) == pytest.approx(2 / 3)
    assert grounding_reward(("Mirt",), later) == 0.0  # whole words only
    assert grounding_reward(None, later) == grounding_reward((), later) == 0.0


def test_hindsight_writes_v2_traces_with_keywords_of_the_real_observation():
    from megatron_foresight.data.trajectory import MCEstimate, Outcome, Trajectory, Turn
    from plugins.fe_sft.hindsight import expected_keywords, foresight_trace

    t = Trajectory(id="t", task_id="q", task_type="search", prompt="Question: where?",
                   turns=(Turn("agent", "<think>look</think>\n<search>Kalo</search>"),
                          Turn("env", "<information>Doc 1 (Title: Kalo) Kalo lies in Mirten, "
                                      "founded 1510.</information>"),
                          Turn("agent", "<answer>Mirten</answer>")),
                   outcome=Outcome(True, 1.0, "Mirten"), mc=(MCEstimate(0, 4, 3),))
    assert expected_keywords("Doc 1 (Title: Kalo) Kalo lies in Mirten, founded 1510.") == (
        "Kalo", "Mirten", "1510")
    assert expected_keywords("The answer is correct.") == ("correct",)
    tally = Counter()
    trace = foresight_trace(t, tally, V2)
    first = V2.parse_turn(trace.turns[0].text)
    assert isinstance(first, AgentTurn) and first.think == "look"
    assert first.foresight == Foresight('Search for Kalo, then answer.',
                                        "Doc 1 (Title: Kalo) Kalo lies in Mirten, founded 1510.",
                                        0.75, ("Kalo", "Mirten", "1510"))
    last = V2.parse_turn(trace.turns[2].text)
    assert last.foresight.rollout == "The answer is correct." and last.foresight.value == 1.0
    assert trace.prompt.startswith("Before each action, write <imaginary>")
    assert tally["turns with foresight"] == 2


def _record(tok, texts, success, task_type="search"):
    task = Task("q-1", task_type, "Where is Kalo?", ("Mirten",))
    ids = tok.encode("Where is Kalo?\n")
    turns = []
    for k, text in enumerate(texts):
        turn_ids = tok.encode(text)
        obs = "<information>Doc 1 (Title: Kalo) Kalo lies in Mirten.</information>" \
            if k < len(texts) - 1 else None
        turns.append(AgentTurnRecord(text, turn_ids, [-0.1] * len(turn_ids), obs, "stop",
                                     start=len(ids)))
        ids = ids + turn_ids + tok.encode("\n")
        if obs:
            ids = ids + tok.encode(obs + "\n")
    return EpisodeRecord(task, "Where is Kalo?", turns, success, float(success), "answer", ids)


def test_step_grpo_by_hand():
    """Two samples of one task, two turns each. A_episode: task 1 vs 0 -> +-1/sqrt(2).
    A_step at each turn: (confidence + grounding) of the two samples at that turn, normalized
    -> +-1/sqrt(2) where they differ, 0 where equal; every token of turn k gets
    A_episode + 0.2 * A_step(k) (search)."""
    tok = ByteTokenizer()

    def turn(conf, keywords, action):
        return V2.render_turn(AgentTurn(action, Foresight("p", "x", conf, keywords), None))

    search, answer = Action("search", "Kalo", 0), Action("answer", "Mirten", 0)
    a = _record(tok, [turn(0.9, ("Mirten",), search), turn(0.9, ("correct",), answer)], True)
    b = _record(tok, [turn(0.9, ("Mirten",), search), turn(0.2, ("Vasru",), answer)], False)
    weights = {"task": 1.0, "confidence": 1.0, "grounding": 1.0}
    scored = score_rewards([a, b], weights, tok, fmt=V2)
    # turn 1: both ground Mirten (1.0); confidence 1 - 0.01 vs 0 - 0.81 -> differ
    assert scored[0].turns[0].rewards == {"confidence": pytest.approx(0.99), "grounding": 1.0}
    assert scored[1].turns[0].rewards == {"confidence": pytest.approx(-0.81), "grounding": 1.0}
    samples = [to_sample(x, 1024, 0) for x in scored]
    StepGRPO(StepGRPOConfig(), weights).advantages(scored, samples, 2)
    r = 1 / math.sqrt(2)
    for x, sample, sign in ((scored[0], samples[0], 1), (scored[1], samples[1], -1)):
        expected = torch.zeros(len(x.record.ids))
        for t in x.record.turns:  # both turns differ between the samples: A_step = +-r
            expected[t.start:t.start + len(t.ids)] = sign * r + 0.2 * sign * r
        m = len(x.record.ids) - 1
        assert sample["advantages"][:m].tolist() == pytest.approx(expected[1:].tolist(),
                                                                  abs=1e-5)
    math_a = _record(tok, [turn(0.5, (), answer)], True, "math")
    math_b = _record(tok, [turn(0.5, (), answer)], False, "math")
    scored = score_rewards([math_a, math_b], weights, tok, fmt=V2)
    samples = [to_sample(x, 1024, 0) for x in scored]
    StepGRPO(StepGRPOConfig(), weights).advantages(scored, samples, 2)
    t = math_a.turns[0]
    # confidence 1 - 0.25 vs 0 - 0.25 differ; math's w is 0.1
    assert samples[0]["advantages"][t.start - 1].item() == pytest.approx(r + 0.1 * r, abs=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fc_rl_in_the_paper_tag_set_from_a_v2_fe_sft_policy(medium_world, medium_cache,
                                                           medium_wm_amt, tmp_path):
    """recipes/tiny-cpu-paper: FE-SFT writes v2 traces and learns them from the medium WM-AMT
    run (200 steps; measured: strict v2 parse 0.33 of the turns on 16 validation tasks of the
    default world, 200 new tokens a turn), then FC-RL with step_grpo and the paper's terms
    trains two steps from it and validates in v2."""
    import json

    from helpers.run import REPO, foresight

    recipes = REPO / "recipes" / "tiny-cpu-paper"
    common = [f"data.world={medium_world}", f"data.cache_dir={medium_cache}",
              "data.seq_length=768", "logging.tensorboard=false", "checkpoint.save_interval=0"]
    fe = tmp_path / "fe"
    foresight(["train", str(recipes / "fe_sft.yaml"), *common, "schedule.train_steps=200",
               "schedule.decay_style=cosine", "schedule.anneal_steps=null",  # as measured
               "schedule.eval_interval=0", "schedule.eval_steps=2",
               f"checkpoint.init_from={medium_wm_amt}", "--run-dir", str(fe)], timeout=1800)
    final = json.loads((fe / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["val/loss/keyword"] < 1.5 and final["val/loss/value"] < 1.0
    rl = tmp_path / "rl"
    foresight(["train", str(recipes / "fc_rl.yaml"), *common, f"checkpoint.init_from={fe}",
               "schedule.train_steps=2", "schedule.global_batch_size=4",
               "schedule.micro_batch_size=2", "schedule.eval_interval=0",
               "schedule.eval_at_start=false", "fc_rl.prompts_per_step=2", "fc_rl.group_size=2",
               "fc_rl.max_new_tokens=200", "fc_rl.validation_tasks=8", "--run-dir", str(rl)])
    steps = [json.loads(x) for x in (rl / "metrics.jsonl").read_text().splitlines()]
    assert all({"reward/task", "reward/confidence", "reward/grounding"} <= set(s) and
               "reward/format" not in s for s in steps)
    assert steps[0]["grad_norm"] > 0  # the step advantages moved the policy
    print([round(s["grad_norm"], 4) for s in steps],
          {k: round(steps[-1][k], 3) for k in ("val/format_validity", "val/reward/total",
                                               "rollout/format_validity")})
    assert steps[-1]["val/format_validity"] > 0  # greedy v2 turns that parse strictly
