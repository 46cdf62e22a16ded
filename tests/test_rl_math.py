"""FC-RL's pure functions against hand-computed values: rewards, where they are credited,
GRPO and GAE advantages, the clipped policy loss, both KL estimators, and that tokens off the
loss mask (the environment's) get no gradient."""

import math

import pytest
import torch

from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.foresight.action import Action
from megatron_foresight.foresight.format import AgentTurn, Foresight, render_turn
from megatron_foresight.rl.advantages import (
    gae, group_baseline, groups_with_signal, grpo_advantages, rloo_baseline, whiten,
)
from megatron_foresight.rl.loss import (
    aggregate, kl_estimate, policy_loss, truncated_is_weights, value_loss,
)
from megatron_foresight.rl.rewards import (
    REWARD_TERMS, RewardSettings, TurnContext, calibration_reward, credit_spans, fidelity_reward,
    format_reward, search_task_reward,
)

TURN = render_turn(AgentTurn(Action("search", "Kalo region", 0),
                             Foresight("Search for Kalo.", "Doc 1 (Title: Kalo) Kalo lies in Mir.",
                                       0.7), "I need the region."))


def test_calibration_reward_is_brier_or_log_score():
    assert calibration_reward(0.7, True) == pytest.approx(-0.09)
    assert calibration_reward(0.7, False) == pytest.approx(-0.49)
    assert calibration_reward(0.7, True, "log") == pytest.approx(math.log(0.7))
    assert calibration_reward(0.7, False, "log") == pytest.approx(math.log(0.3))
    assert calibration_reward(1.0, False, "log") == pytest.approx(math.log(1e-3))  # clipped
    assert calibration_reward(None, True) == -1.0  # no value: the worst Brier
    with pytest.raises(ValueError, match="calibration rule"):
        calibration_reward(0.5, True, "hinge")


def test_fidelity_format_and_task_rewards():
    assert fidelity_reward("Kalo lies in Mir", "Kalo lies in Mir.") == 1.0
    # normalized tokens: predicted {kalo, in, mir}, observed {kalo, lies, in, mir} -> P 1, R 3/4
    assert fidelity_reward("Kalo in Mir", "Kalo lies in Mir.") == pytest.approx(2 * 0.75 / 1.75)
    assert fidelity_reward(None, "anything") == 0.0
    assert format_reward(TURN) == 0.0
    assert format_reward("<search>Kalo</search>") == -1.0  # no foresight block
    assert search_task_reward("Mir", ["mir"]) == 1.0
    assert search_task_reward("the Mir hills", ["Mir"], "f1") == pytest.approx(2 * 0.5 / 1.5)
    assert search_task_reward(None, ["Mir"]) == 0.0


def _turn_terms(text, observed, success, rule="brier"):
    from megatron_foresight.foresight.format import parse_turn_lenient

    ctx = TurnContext(text, parse_turn_lenient(text), observed, (observed,), success)
    return tuple(REWARD_TERMS[n].score(ctx, RewardSettings(rule))
                 for n in ("calibration", "fidelity", "format"))


def test_turn_terms_read_the_turn_leniently():
    assert _turn_terms(TURN, "Doc 1 (Title: Kalo) Kalo lies in Mir.", success=False) == (
        pytest.approx(-0.49), 1.0, 0.0)
    broken = TURN.replace("</foresight>", "")
    assert _turn_terms(broken, "Doc 1 (Title: Kalo) Kalo lies in Mir.", success=True) == (
        pytest.approx(-0.09), 1.0, -1.0)
    assert _turn_terms(TURN, "x", True, "log")[0] == pytest.approx(math.log(0.7))


def test_credit_spans_cover_exactly_the_rollout_and_value_blocks():
    tok = ByteTokenizer()
    ids = tok.encode(TURN)
    spans = credit_spans(tok, ids)
    assert tok.decode(ids[slice(*spans["rollout"])]) == \
        "<rollout>Doc 1 (Title: Kalo) Kalo lies in Mir.</rollout>"
    assert tok.decode(ids[slice(*spans["value"])]) == "<value>0.70</value>"
    assert credit_spans(tok, tok.encode("<search>x</search>")) == {}


def test_grpo_advantages_by_hand():
    adv = grpo_advantages(torch.tensor([1., 0., 0., 1., 1., 1., 1., 1.]), group_size=4)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    plain = grpo_advantages(torch.tensor([3., 1.]), group_size=2, normalize_std=False)
    assert plain.tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.zeros(4), group_size=3)


def test_groups_with_signal_counts_groups_whose_rewards_differ():
    # groups of 3: all fail, one success, all succeed, F1-like rewards that differ
    assert groups_with_signal([0, 0, 0, 0, 1, 0, 1, 1, 1, 0.5, 0.5, 0.2], 3) == 0.5
    assert groups_with_signal([0.0] * 8, 4) == 0.0
    with pytest.raises(ValueError, match="groups of 4"):
        groups_with_signal([0.0] * 6, 4)


def test_group_baseline_for_per_turn_rewards_of_uneven_groups():
    out = group_baseline([1.0, 0.0, 0.5, 2.0], groups=[0, 0, 0, 1], normalize_std=False)
    assert out == pytest.approx([0.5, -0.5, 0.0, 0.0])
    out = group_baseline([1.0, 0.0], groups=[0, 0])
    assert out == pytest.approx([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)], rel=1e-5)


def test_rloo_baseline_by_hand():
    # group 0: 1, 0, 0.5 -> 1 - 0.25, 0 - 0.75, 0.5 - 0.5; group 1 alone: 0
    out = rloo_baseline([1.0, 0.0, 0.5, 2.0], groups=[0, 0, 0, 1])
    assert out == pytest.approx([0.75, -0.75, 0.0, 0.0])
    # with equal group sizes it is GRPO's centring scaled by G / (G - 1)
    r = [3.0, 1.0, 2.0, 6.0]
    centred = grpo_advantages(torch.tensor(r), 4, normalize_std=False)
    assert rloo_baseline(r, [0] * 4) == pytest.approx((centred * 4 / 3).tolist())


def test_whiten_over_the_masked_tokens_only():
    adv = torch.tensor([[1., 2., 99.], [3., 4., 99.]])
    mask = torch.tensor([[1., 1., 0.], [1., 1., 0.]])
    out = whiten(adv, mask)
    # 1, 2, 3, 4: mean 2.5, population std sqrt(1.25); the masked-out 99s count for nothing
    z = [(v - 2.5) / (math.sqrt(1.25) + 1e-6) for v in (1, 2, 3, 4)]
    assert out.flatten().tolist() == pytest.approx([z[0], z[1], 0, z[2], z[3], 0], abs=1e-6)


def test_gae_skips_environment_tokens_by_hand():
    # tokens: env, agent, agent, env, agent; reward 1 on the last agent token
    mask = torch.tensor([[0., 1., 1., 0., 1.]])
    rewards = torch.tensor([[0., 0., 0., 0., 1.]])
    values = torch.tensor([[9., .5, .6, 9., .8]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t4: 1 - .8 = .2; t2: (0 + .8 - .6) + .5 * .2 = .3; t1: (0 + .6 - .5) + .5 * .3 = .25
    assert adv[0].tolist() == pytest.approx([0, .25, .3, 0, .2])
    assert ret[0].tolist() == pytest.approx([0, .75, .9, 0, 1.0])
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # t4: .2; t2: (.5 * .8 - .6) + .5 * .2 = -.1; t1: (.5 * .6 - .5) + .5 * -.1 = -.25
    assert adv[0].tolist() == pytest.approx([0, -.25, -.1, 0, .2])


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]]))
    adv = torch.tensor([[1., 1., -1., -1.]])
    loss, m = policy_loss(new, old, adv, torch.ones(1, 4), clip_low=0.2, clip_high=0.2)
    # per token: -min(1.5, 1.2) ; -min(.5, .8) ; -min(-.5, -.8) ; -min(-1.5, -1.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert m["clip_fraction"].item() == pytest.approx(0.5)
    # an asymmetric upper clip (DAPO's clip-higher) lets the first token's ratio reach 1.5
    loss, _ = policy_loss(new, old, adv, torch.ones(1, 4), clip_low=0.2, clip_high=0.6)
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 0.8 + 1.5) / 4)


def test_kl_estimators_by_hand():
    p, q = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert kl_estimate(p, q, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(p, q, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    assert kl_estimate(p, p, "k3").item() == 0.0
    loss, m = policy_loss(p[None], p[None], torch.zeros(1, 1), torch.ones(1, 1),
                          ref_logprobs=q[None], kl_coef=0.1, kl_kind="k1")
    assert loss.item() == pytest.approx(0.1 * math.log(2)) and m["kl"].item() == \
        pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="KL estimator"):
        kl_estimate(p, q, "k2")


def test_token_and_sequence_aggregation():
    per_token = torch.tensor([[1., 2., 9.], [3., 9., 9.]])
    mask = torch.tensor([[1., 1., 0.], [1., 0., 0.]])
    assert aggregate(per_token, mask, "token").item() == pytest.approx(2.0)
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx(2.25)


def test_environment_tokens_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 6))
    logprobs = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    mask = torch.tensor([[0., 1., 1., 0., 0., 1.], [0., 0., 1., 1., 1., 0.]])  # 0: env / prompt
    loss, _ = policy_loss(logprobs, logprobs.detach(), torch.randn(2, 6), mask,
                          ref_logprobs=logprobs.detach() - 0.1, kl_coef=0.05)
    loss.backward()
    grad_per_token = logits.grad.abs().sum(-1)
    assert (grad_per_token[mask == 0] == 0).all()
    assert (grad_per_token[mask == 1] > 0).all()


def test_truncated_importance_weights_and_value_loss():
    w = truncated_is_weights(torch.log(torch.tensor([0.9, 0.2])), torch.log(torch.tensor([0.3, 0.4])),
                             cap=2.0)
    assert w.tolist() == pytest.approx([2.0, 0.5])
    v = torch.tensor([[1.0, 0.0]])
    loss = value_loss(v, torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 0.0]]),
                      torch.ones(1, 2), clip=0.2)
    # token 0: max((1 - 0)^2, (0.7 - 0)^2) = 1; token 1: 0 -> 0.5 * mean = 0.25
    assert loss.item() == pytest.approx(0.25)
