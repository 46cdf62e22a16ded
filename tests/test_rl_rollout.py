"""FC-RL's rollout layer: the ids trained on are exactly the ids the policy sampled, across
several turns; each reward's advantage lies on the tokens that earned it."""

import math

import pytest
import torch

from megatron_foresight.tasks import Task
from megatron_foresight.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from megatron_foresight.foresight.action import Action
from megatron_foresight.foresight.format import AgentTurn, Foresight, render_turn
from megatron_foresight.inference.agent import AgentTurnRecord, EpisodeRecord
from megatron_foresight.rl.algorithms import GRPO, RLOO, GRPOConfig, RLOOConfig
from megatron_foresight.rl.rewards import credit_spans
from megatron_foresight.rl.rollout import score_rewards, to_sample

WEIGHTS = {"task": 1.0, "calibration": 0.5, "fidelity": 0.5, "format": 0.5}


def _advantages(algorithm, scored, group_size, seq_length=512):
    """The algorithm's advantages of each episode, as `to_sample` lays the episode out."""
    samples = [to_sample(x, seq_length, 0) for x in scored]
    algorithm.advantages(scored, samples, group_size)
    return samples


def test_trained_ids_are_the_sampled_ids_across_turns(small_world, megatron_cpu, tmp_path):
    from megatron_foresight.config import load_recipe
    from megatron_foresight.inference.agent import run_episodes
    from megatron_foresight.inference.generate import Generator, Sampling
    from megatron_foresight.models.provider import build_model
    from helpers.run import REPO, world_task_sets

    torch.manual_seed(3)
    world = small_world
    tok = SentencePieceTokenizer(str(world / "tokenizer" / "spm.model"))
    (model,) = build_model(load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml"), 1024)
    envs = world_task_sets(world, tmp_path)
    tasks = envs.tasks("validation", 2)
    group = 2
    records = run_episodes(Generator(model.eval(), tok, max_sequence_length=512),
                           [t for t in tasks for _ in range(group)], envs.make_env,
                           Sampling(temperature=1.0, max_new_tokens=8, seed=4), progress=False)
    assert max(len(r.turns) for r in records) >= 3  # several turns: the test means something
    scored = score_rewards(records, WEIGHTS, tok)
    samples = _advantages(GRPO(GRPOConfig(), WEIGHTS), scored, group)
    for x, sample in zip(scored, samples):
        mask = sample["loss_mask"] > 0
        trained = sample["labels"][mask].tolist()
        assert trained == [i for t in x.record.turns for i in t.ids]  # token in, token out
        assert sample["rollout_logprobs"][mask].tolist() == pytest.approx(
            [lp for t in x.record.turns for lp in t.logprobs])
        n = min(len(x.record.ids) - 1, 512)  # an episode past the sequence is cut
        assert sample["tokens"][:n].tolist() == x.record.ids[:n]
        assert sample["labels"][:n].tolist() == x.record.ids[1:n + 1]
        # environment and prompt tokens carry neither loss nor advantage
        assert (sample["advantages"][~mask] == 0).all()


def _turn(value: float, rollout: str) -> str:
    return render_turn(AgentTurn(Action("answer", "Mir", 0),
                                 Foresight("Answer Mir.", rollout, value), "I know it."))


def _record(tok, text: str, success: bool) -> EpisodeRecord:
    task = Task("search-1", "search", "Where is Kalo?", ("Mir",))
    prompt_ids = tok.encode("Where is Kalo?\n")
    ids = tok.encode(text)
    turn = AgentTurnRecord(text, ids, [-0.1] * len(ids), None, "stop", start=len(prompt_ids))
    return EpisodeRecord(task, "Where is Kalo?", [turn], success, float(success), "answer",
                         prompt_ids + ids + tok.encode("\n"))


def test_each_reward_is_credited_to_its_own_tokens_by_hand():
    tok = ByteTokenizer()
    text = _turn(0.9, "The answer is correct.")
    right, wrong = _record(tok, text, True), _record(tok, text, False)
    scored = score_rewards([right, wrong], WEIGHTS, tok)
    samples = _advantages(GRPO(GRPOConfig(), WEIGHTS), scored, 2)
    # task 1 vs 0; calibration -(0.1)^2 vs -(0.9)^2; fidelity 1 vs F1(correct|wrong) = 2/3;
    # format 0 for both. Two values normalize to +-1/sqrt(2) (unbiased std), equal ones to 0.
    a = 1 / math.sqrt(2)
    spans = credit_spans(tok, right.turns[0].ids)
    for x, sample, sign in ((scored[0], samples[0], 1), (scored[1], samples[1], -1)):
        start, n = x.record.turns[0].start, len(x.record.turns[0].ids)
        expected = torch.zeros(len(x.record.ids))
        expected[start:start + n] = sign * a                  # task: the whole turn
        for kind in ("value", "rollout"):                     # calibration / fidelity: own block
            s, e = spans[kind]
            expected[start + s:start + e] += sign * 0.5 * a
        m = len(x.record.ids) - 1                             # to_sample: shifted by one
        assert sample["advantages"][:m].tolist() == pytest.approx(expected[1:].tolist(),
                                                                  abs=1e-5)
    assert scored[0].rewards["calibration"] == pytest.approx(-0.01)
    assert scored[1].rewards["fidelity"] == pytest.approx(2 / 3)
    assert scored[0].rewards["total"] == pytest.approx(1 + 0.5 * (-0.01) + 0.5 * 1.0)


def test_rloo_credits_the_leave_one_out_advantage_by_hand():
    """Three samples: rewards 1, 0, 0 -> task advantages 1 - 0, 0 - 1/2, 0 - 1/2 on every token
    of the turn; the per-turn terms against the other two turns of the group."""
    tok = ByteTokenizer()
    text = _turn(0.9, "The answer is correct.")
    records = [_record(tok, text, True), _record(tok, text, False), _record(tok, text, False)]
    only_task = {"task": 1.0}
    scored = score_rewards(records, only_task, tok)
    samples = _advantages(RLOO(RLOOConfig(), only_task), scored, 3)
    for x, sample, adv in zip(scored, samples, (1.0, -0.5, -0.5)):
        start, n = x.record.turns[0].start, len(x.record.turns[0].ids)
        expected = torch.zeros(len(x.record.ids))
        expected[start:start + n] = adv
        m = len(x.record.ids) - 1
        assert sample["advantages"][:m].tolist() == pytest.approx(expected[1:].tolist())
    assert set(scored[0].rewards) == {"task", "total"}  # terms not weighed are not scored
    calibration = {"calibration": 1.0}
    scored = score_rewards(records, calibration, tok)
    samples = _advantages(RLOO(RLOOConfig(), calibration), scored, 3)
    # -(0.1)^2 = -0.01 against the mean of two -(0.9)^2 = -0.81: +0.8; the others -0.4
    s, e = credit_spans(tok, records[0].turns[0].ids)["value"]
    start = records[0].turns[0].start
    for sample, adv in zip(samples, (0.8, -0.4, -0.4)):
        assert sample["advantages"][start + s - 1:start + e - 1].tolist() == pytest.approx(
            [adv] * (e - s), abs=1e-6)
        assert (sample["advantages"][:start + s - 1] == 0).all()


def test_ppo_rewards_sit_on_the_last_token_of_the_block_that_earned_them():
    tok = ByteTokenizer()
    text = _turn(0.9, "The answer is correct.")
    right, wrong = _record(tok, text, True), _record(tok, text, False)
    scored = score_rewards([right, wrong], WEIGHTS, tok)
    spans = credit_spans(tok, right.turns[0].ids)
    for x, task, calibration, fidelity in ((scored[0], 1.0, -0.01, 1.0),
                                           (scored[1], 0.0, -0.81, 2 / 3)):
        start, n = x.record.turns[0].start, len(x.record.turns[0].ids)
        expected = torch.zeros(len(x.record.ids))
        expected[start + spans["value"][1] - 1] += 0.5 * calibration
        expected[start + spans["rollout"][1] - 1] += 0.5 * fidelity
        expected[start + n - 1] += 0.5 * 0.0 + 1.0 * task     # format 0, then the task reward
        assert x.token_rewards.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
        sample = to_sample(x, 512, tok.eod)                   # aligned like the advantages
        assert sample["token_rewards"][:len(x.record.ids) - 1].tolist() == pytest.approx(
            expected[1:].tolist(), abs=1e-6)


def test_value_head_reads_the_final_norm_and_trains_the_trunk(megatron_cpu):
    from megatron_foresight.config import load_recipe
    from megatron_foresight.models.provider import build_model
    from megatron_foresight.rl.value_head import attach_value_head
    from helpers.run import REPO

    torch.manual_seed(5)
    (model,) = build_model(load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml"), 384)
    head = attach_value_head(model)
    assert "value_head.linear.weight" in model.state_dict()   # checkpointed with the model
    with torch.no_grad():
        head.linear.weight.normal_()
        head.linear.bias.fill_(0.25)
    tokens = torch.randint(0, 300, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    hidden = {}
    model.decoder.final_layernorm.register_forward_hook(
        lambda _m, _i, out: hidden.setdefault("h", out.detach()))
    ce = model(tokens, positions, None, labels=tokens)
    assert head.last.shape == ce.shape == (2, 16)            # [batch, sequence], like the loss
    by_hand = hidden["h"].transpose(0, 1) @ head.linear.weight[0] + 0.25
    assert torch.allclose(head.last, by_hand, atol=1e-4)
    head.last.sum().backward()                               # the critic's gradient
    assert model.decoder.layers[0].mlp.linear_fc1.weight.grad.abs().sum() > 0  # reaches the trunk


def test_padded_vocabulary_gets_no_probability_in_training_as_in_sampling(megatron_cpu):
    from megatron_foresight.config import load_recipe
    from megatron_foresight.models.provider import build_model, mask_padded_vocab
    from helpers.run import REPO

    torch.manual_seed(6)
    (model,) = build_model(load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml"), 384)
    tokens = torch.randint(0, 300, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    before = model(tokens, positions, None, labels=tokens)
    mask_padded_vocab(model, 300)                           # ids 300..383 are padding
    logits = model(tokens, positions, None, runtime_gather_output=True)
    assert torch.isinf(logits[..., 300:]).all() and torch.isfinite(logits[..., :300]).all()
    ce = model(tokens, positions, None, labels=tokens)      # the loss path (vocab-parallel CE)
    logp = torch.log_softmax(logits[..., :300].float(), -1)
    by_hand = -logp.gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(ce, by_hand, atol=1e-5)
    assert (ce < before).all()                              # the padded rows had taken mass


def test_to_sample_cuts_an_episode_longer_than_the_sequence():
    tok = ByteTokenizer()
    record = _record(tok, _turn(0.5, "x" * 100), True)
    (x,) = score_rewards([record], WEIGHTS, tok)
    sample = to_sample(x, 64, tok.eod)
    assert all(v.shape == (64,) for v in sample.values())
    assert sample["labels"].tolist() == record.ids[1:65]
