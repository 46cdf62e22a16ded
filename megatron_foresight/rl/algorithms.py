"""FC-RL's algorithms, one class each, chosen by `fc_rl.algorithm.type` in the recipe with its
own typed section (`fc_rl.algorithm: {type: ppo, gae_lambda: 0.95}`, or just `algorithm: ppo`).

An algorithm has three hooks: `extend_model` (modules it adds to the policy: PPO's critic),
`advantages` (the scored episodes of one step -> each sample's per-token advantages, after the
log-probabilities and values of the sampling policy were recomputed), and `loss` (per-token loss
terms beside the clipped policy loss: PPO's value loss). The math is `rl.advantages`' pure
functions. A new algorithm is a `AlgorithmConfig` variant and an `Algorithm` subclass registered
together with `register_algorithm`, in any module imported before the recipe is read.

* grpo: each term's reward normalized within the task's group of G samples (per-turn terms
  against the other turns of the group), each advantage on the tokens its term is credited to.
* rloo: the same layout with a leave-one-out baseline (each sample against the mean of the
  other G - 1), unscaled: REINFORCE with an unbiased baseline.
* ppo: a critic (a value head on the policy) and generalized advantage estimation over the
  per-token rewards, each where it was earned; clipped value loss.
* step_grpo: the paper variant as a secondary summary of arXiv 2606.27483 reports it (not
  confirmed from the paper itself): the episode's reward normalized within the group
  (A_episode), the per-turn world-model reward (confidence + grounding) normalized within the
  group's samples at the same turn (A_step), and A_episode + w * A_step on each turn's tokens,
  w = 0.2 for search and 0.1 for math.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch

from megatron_foresight.configtree import Variant, check
from megatron_foresight.rl.advantages import (
    gae, group_baseline, grpo_advantages, rloo_baseline, whiten,
)
from megatron_foresight.rl.loss import per_token_value_loss
from megatron_foresight.rl.rollout import ScoredEpisode, active_terms, align


@dataclass
class AlgorithmConfig(Variant):
    """How FC-RL turns rewards into advantages."""

    type: str = "grpo"
    """The algorithm (grpo, rloo, ppo, or one a module in `extensions` registers)."""

    min_group_size: ClassVar[int] = 2

    def check_recipe(self, cfg) -> None:
        """What the algorithm needs of the rest of the recipe."""


class Algorithm(ABC):
    Config: ClassVar[type[AlgorithmConfig]]
    needs_values: ClassVar[bool] = False
    """Whether the sampling policy's critic values are recomputed with its log-probs
    (`sample["old_values"]`)."""

    def __init__(self, config: AlgorithmConfig, weights: dict[str, float]):
        self.config, self.weights = config, weights

    def extend_model(self, chunks: list, ctx) -> tuple[str, ...]:
        """Modules added to the policy before DDP wraps it; their state-dict prefixes."""
        return ()

    @abstractmethod
    def advantages(self, scored: Sequence[ScoredEpisode], samples: list[dict],
                   group_size: int) -> dict[str, float]:
        """Set each sample's `advantages` (and whatever `loss` reads); return metrics."""

    def loss(self, batch: dict) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """Per-token loss added to the policy loss, and (value, mask)-ready metrics tensors."""
        return 0.0, {}


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str):
    """Register an `Algorithm` subclass and its config (`Algorithm.Config`) under `name`."""
    def register(cls: type[Algorithm]) -> type[Algorithm]:
        AlgorithmConfig.variant(name)(cls.Config)
        ALGORITHMS[name] = cls
        return cls
    return register


def build_algorithm(config: AlgorithmConfig, weights: dict[str, float]) -> Algorithm:
    return ALGORITHMS[config.type](config, weights)


# ----------------------------------------------------------------------------------------------
# group baselines: GRPO and RLOO


def credit_tokens(scored: Sequence[ScoredEpisode], weights: dict[str, float],
                  episode_adv: dict[str, torch.Tensor], turn_adv: dict[str, list[float]]
                  ) -> list[torch.Tensor]:
    """Each episode's per-token advantages ([len(ids)]) from each term's advantage: an episode
    term's (`episode_adv[name][e]`) on every token of every turn, a per-turn term's
    (`turn_adv[name][i]`, turns numbered across the episodes) on its turn's tokens, or on its
    block's tokens in that turn. Whole-turn advantages are summed before they are added, in
    the terms' order, then block advantages are added one by one."""
    terms = active_terms(weights)
    out, i = [], 0
    for e, x in enumerate(scored):
        adv = torch.zeros(len(x.record.ids))
        for turn, st in zip(x.record.turns, x.turns):
            a, n = turn.start, len(turn.ids)
            whole = None
            for term, w in terms:
                if term.credit == "episode":
                    part = w * episode_adv[term.name][e]
                elif term.credit == "turn":
                    part = w * turn_adv[term.name][i]
                else:
                    continue
                whole = part if whole is None else whole + part
            if whole is not None:
                adv[a:a + n] += whole
            for term, w in terms:
                if term.scope == "turn" and term.credit not in ("turn", "episode") \
                        and term.credit in st.spans:
                    s, t = st.spans[term.credit]
                    adv[a + s:a + t] += w * turn_adv[term.name][i]
            i += 1
        out.append(adv)
    return out


def _per_term(scored: Sequence[ScoredEpisode], weights: dict[str, float], group_size: int,
              episode_fn, turn_fn):
    """Each episode term's advantages over the episodes, each turn term's over all turns."""
    if len(scored) % group_size:
        raise ValueError(f"{len(scored)} episodes do not split into groups of {group_size}")
    groups = [e // group_size for e, x in enumerate(scored) for _ in x.turns]
    episode_adv, turn_adv = {}, {}
    for term, _ in active_terms(weights):
        if term.scope == "episode":
            rewards = torch.tensor([x.episode_rewards[term.name] for x in scored],
                                   dtype=torch.float32)
            episode_adv[term.name] = episode_fn(rewards)
        else:
            turn_adv[term.name] = turn_fn([st.rewards[term.name] for x in scored
                                           for st in x.turns], groups)
    return episode_adv, turn_adv


def _set_advantages(samples: list[dict], per_token: list[torch.Tensor]) -> None:
    for sample, adv in zip(samples, per_token):
        sample["advantages"] = align(adv, len(sample["tokens"]))


@dataclass
class GRPOConfig(AlgorithmConfig):
    """GRPO: rewards normalized within each task's group of samples."""

    type: str = "grpo"
    scale_by_std: bool = True
    """Divide the group-centred rewards by the group's std (false: centre only, Dr. GRPO)."""


@register_algorithm("grpo")
class GRPO(Algorithm):
    Config = GRPOConfig

    def advantages(self, scored, samples, group_size):
        scale = self.config.scale_by_std
        episode_adv, turn_adv = _per_term(
            scored, self.weights, group_size,
            lambda r: grpo_advantages(r, group_size, scale),
            lambda values, groups: group_baseline(values, groups, scale))
        _set_advantages(samples, credit_tokens(scored, self.weights, episode_adv, turn_adv))
        return {}


@dataclass
class RLOOConfig(AlgorithmConfig):
    """RLOO: each sample against the mean reward of the other samples of its task."""

    type: str = "rloo"


@register_algorithm("rloo")
class RLOO(Algorithm):
    Config = RLOOConfig

    def advantages(self, scored, samples, group_size):
        groups = [e // group_size for e in range(len(scored))]
        episode_adv, turn_adv = _per_term(
            scored, self.weights, group_size,
            lambda r: torch.tensor(rloo_baseline(r.tolist(), groups), dtype=torch.float32),
            rloo_baseline)
        _set_advantages(samples, credit_tokens(scored, self.weights, episode_adv, turn_adv))
        return {}


# ----------------------------------------------------------------------------------------------
# PPO


@dataclass
class PPOConfig(AlgorithmConfig):
    """PPO: a critic on the policy and generalized advantage estimation."""

    type: str = "ppo"
    gamma: float = 1.0
    """Discount per agent token (environment tokens are skipped)."""
    gae_lambda: float = 0.95
    """GAE's lambda (1: Monte-Carlo returns minus the value; 0: one-step TD)."""
    value_coef: float = 0.5
    """Weight of the critic's loss beside the policy loss."""
    value_clip: Optional[float] = 0.2
    """Clip each new value to old value +- this in the critic loss; null: no clip."""
    whiten: bool = True
    """Whiten the advantages over the step's agent tokens."""

    min_group_size: ClassVar[int] = 1

    def __post_init__(self):
        check(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        check(0 <= self.gae_lambda <= 1, "gae_lambda", "must be in [0, 1]")
        check(self.value_coef >= 0, "value_coef", "must be >= 0")
        check(self.value_clip is None or self.value_clip > 0, "value_clip", "null or > 0")

    def check_recipe(self, cfg) -> None:
        check(not cfg.parallel.sequence_parallel, "parallel.sequence_parallel",
              "PPO's value head reads whole final hidden states; set sequence_parallel: false "
              "with fc_rl.algorithm.type: ppo")


@register_algorithm("ppo")
class PPO(Algorithm):
    Config = PPOConfig
    needs_values = True

    def __init__(self, config, weights):
        super().__init__(config, weights)
        self.value_head = None

    def extend_model(self, chunks, ctx):
        """The critic, a value head on the policy's last stage. The FE-SFT checkpoint that
        checkpoint.init_from names has none, so it starts fresh there (a resumed run loads it)."""
        from megatron_foresight.rl.value_head import PREFIX, attach_value_head

        if ctx.is_last_stage:
            self.value_head = attach_value_head(chunks[-1])
        return (PREFIX,)

    def advantages(self, scored, samples, group_size):
        """GAE over each sample's per-token rewards and the critic's values at rollout time;
        the returns the critic regresses on."""
        c = self.config
        mask = torch.stack([x["loss_mask"] for x in samples]).float()
        values = torch.stack([x["old_values"] for x in samples]) * mask
        rewards = torch.stack([x["token_rewards"] for x in samples]).float()
        adv, returns = gae(rewards, values, mask, c.gamma, c.gae_lambda)
        if c.whiten:
            adv = whiten(adv, mask)
        for i, x in enumerate(samples):
            x["advantages"], x["returns"] = adv[i], returns[i]
        n = mask.sum().clamp(min=1)
        return {"critic/value_mean": ((values * mask).sum() / n).item(),
                "critic/return_mean": ((returns * mask).sum() / n).item()}

    def loss(self, batch):
        critic = per_token_value_loss(self.value_head.last, batch["returns"].float(),
                                      batch["old_values"].float(), self.config.value_clip)
        return self.config.value_coef * critic, {"value_loss": critic.detach()}


# ----------------------------------------------------------------------------------------------
# the paper's variant


@dataclass
class StepGRPOConfig(AlgorithmConfig):
    """The paper variant: A_episode + w * A_step on each turn's tokens.

    As a secondary summary of arXiv 2606.27483 reports it (not confirmed from the paper
    itself)."""

    type: str = "step_grpo"
    step_weights: dict[str, float] = field(default_factory=lambda: {"search": 0.2, "math": 0.1})
    """w of A_episode + w * A_step, per environment (the task's type)."""
    default_step_weight: float = 0.1
    """w for an environment not in step_weights."""
    scale_by_std: bool = True
    """Divide group-centred rewards by the group's std."""


@register_algorithm("step_grpo")
class StepGRPO(Algorithm):
    """A_episode: the episode terms (task) normalized within the task's group, as GRPO. A_step:
    the per-turn terms of turn k (the world-model reward: confidence + grounding), weighted and
    summed, normalized within the group's samples at the same turn k. Every token of turn k
    gets A_episode + w * A_step(k), w by the task's environment."""

    Config = StepGRPOConfig

    def advantages(self, scored, samples, group_size):
        c, terms = self.config, active_terms(self.weights)
        if len(scored) % group_size:
            raise ValueError(f"{len(scored)} episodes do not split into groups of {group_size}")
        episode = torch.zeros(len(scored))
        for term, w in terms:
            if term.scope == "episode":
                rewards = torch.tensor([x.episode_rewards[term.name] for x in scored],
                                       dtype=torch.float32)
                episode += w * grpo_advantages(rewards, group_size, c.scale_by_std)
        steps = [sum(w * st.rewards[t.name] for t, w in terms if t.scope == "turn")
                 for x in scored for st in x.turns]
        keys = [(e // group_size, k) for e, x in enumerate(scored) for k in range(len(x.turns))]
        labels = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        step_adv = group_baseline(steps, [labels[key] for key in keys], c.scale_by_std)
        per_token, i = [], 0
        for e, x in enumerate(scored):
            adv = torch.zeros(len(x.record.ids))
            w = c.step_weights.get(x.record.task.type, c.default_step_weight)
            for turn in x.record.turns:
                adv[turn.start:turn.start + len(turn.ids)] = episode[e] + w * step_adv[i]
                i += 1
            per_token.append(adv)
        _set_advantages(samples, per_token)
        return {}
