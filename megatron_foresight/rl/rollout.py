"""From episodes to what the policy is trained on.

`score_groups` turns G episodes per prompt into rewards and per-token advantages:

* the task reward (the environment's verdict) is normalized within each prompt's group (GRPO)
  and its advantage lies on every token the agent wrote in the episode;
* each turn's calibration, fidelity and format rewards are normalized against the same
  components of the other turns of the group (a per-turn GRPO baseline); the calibration
  advantage lies only on the tokens of that turn's <value> block, the fidelity advantage only
  on its <rollout> block, the format advantage on all of that turn's tokens.

So a well-calibrated value is reinforced where it was written, not smeared over the actions
around it. `to_sample` lays an episode out as one training sequence: the ids the policy sampled,
unchanged (token in, token out), with a loss mask that is 1 exactly on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from megatron_foresight.inference.agent import EpisodeRecord
from megatron_foresight.rl.advantages import group_baseline, grpo_advantages
from megatron_foresight.rl.rewards import credit_spans, turn_rewards
from megatron_foresight.foresight.tags import ROLLOUT, VALUE

COMPONENTS = ("task", "calibration", "fidelity", "format")


@dataclass(frozen=True)
class RewardWeights:
    task: float = 1.0
    calibration: float = 0.5
    fidelity: float = 0.5
    format: float = 0.5


@dataclass
class ScoredEpisode:
    record: EpisodeRecord
    advantages: torch.Tensor
    """[len(record.ids)] advantage of each token (0 off the agent's tokens)."""
    rewards: dict[str, float] = field(default_factory=dict)
    """Each component (a turn component averaged over the episode's turns) and `total`."""
    token_rewards: torch.Tensor | None = None
    """[len(record.ids)] PPO's per-token rewards, weighted, each where it was earned: a turn's
    calibration reward on the last token of its <value> block, its fidelity reward on the last
    token of its <rollout> block (on the turn's last token when the block is missing), its
    format reward on the turn's last token, the task reward on the episode's last agent token."""


def episode_total(rewards: dict[str, float], weights: RewardWeights) -> float:
    return sum(getattr(weights, c) * rewards[c] for c in COMPONENTS)


def score_groups(records: Sequence[EpisodeRecord], group_size: int, tokenizer,
                 weights: RewardWeights = RewardWeights(), rule: str = "brier",
                 normalize_std: bool = True) -> list[ScoredEpisode]:
    """Rewards and token advantages of episodes laid out group by group (G per prompt)."""
    if len(records) % group_size:
        raise ValueError(f"{len(records)} episodes do not split into groups of {group_size}")
    task = torch.tensor([r.reward for r in records], dtype=torch.float32)
    task_adv = grpo_advantages(task, group_size, normalize_std)
    turns = [(e, k, turn_rewards(t.text, r.observed(k), r.success, rule))
             for e, r in enumerate(records) for k, t in enumerate(r.turns)]
    groups = [e // group_size for e, _, _ in turns]
    baselined = {name: group_baseline([getattr(tr, name) for _, _, tr in turns], groups,
                                      normalize_std)
                 for name in ("calibration", "fidelity", "format")}
    out = [ScoredEpisode(r, torch.zeros(len(r.ids)), {"task": r.reward},
                         torch.zeros(len(r.ids))) for r in records]
    per_episode: dict[int, list] = {}
    for i, (e, k, tr) in enumerate(turns):
        per_episode.setdefault(e, []).append(tr)
        turn = records[e].turns[k]
        a, n = turn.start, len(turn.ids)
        adv = out[e].advantages
        adv[a:a + n] += weights.task * task_adv[e] + weights.format * baselined["format"][i]
        spans = credit_spans(tokenizer, turn.ids, turn.text)
        for kind, name in ((VALUE, "calibration"), (ROLLOUT, "fidelity")):
            if kind in spans:
                s, t = spans[kind]
                adv[a + s:a + t] += getattr(weights, name) * baselined[name][i]
        if n:
            earned = out[e].token_rewards
            earned[a + n - 1] += weights.format * tr.format
            for kind, name in ((VALUE, "calibration"), (ROLLOUT, "fidelity")):
                end = a + spans[kind][1] - 1 if kind in spans else a + n - 1
                earned[end] += getattr(weights, name) * getattr(tr, name)
    for e, scored in enumerate(out):
        last = scored.record.turns[-1] if scored.record.turns else None
        if last is not None and last.ids:
            end = last.start + len(last.ids) - 1
            scored.token_rewards[end] += weights.task * scored.record.reward
        trs = per_episode.get(e, [])
        for name in ("calibration", "fidelity", "format"):
            scored.rewards[name] = sum(getattr(tr, name) for tr in trs) / len(trs) if trs else 0.0
        scored.rewards["total"] = episode_total(scored.rewards, weights)
    return out


def agent_tokens(record: EpisodeRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """[len(record.ids)] each: 1 on the tokens the agent sampled (0 on prompt and
    environment), and the sampler's log-probability of each of them."""
    mask, logprobs = torch.zeros(len(record.ids)), torch.zeros(len(record.ids))
    for turn in record.turns:
        mask[turn.start:turn.start + len(turn.ids)] = 1
        logprobs[turn.start:turn.start + len(turn.ids)] = torch.tensor(turn.logprobs)
    return mask, logprobs


def to_sample(scored: ScoredEpisode, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One episode as a next-token training sequence of `seq_length`: position j reads
    ids[j] and is scored on ids[j + 1], so the loss mask, advantages and rollout log-probs are
    those of ids[1:]. Padding (and anything past the sequence) carries no loss."""
    ids = torch.tensor(scored.record.ids, dtype=torch.long)[:seq_length + 1]
    n = len(ids) - 1
    mask, logprobs = agent_tokens(scored.record)

    def pad(x, value=0):
        full = torch.full((seq_length,), value, dtype=x.dtype)
        full[:n] = x[:n]
        return full
    return {"tokens": pad(ids[:-1], pad_id), "labels": pad(ids[1:], pad_id),
            "position_ids": torch.arange(seq_length),
            "loss_mask": pad(mask[1:n + 1]), "advantages": pad(scored.advantages[1:n + 1]),
            "rollout_logprobs": pad(logprobs[1:n + 1]),
            "token_rewards": pad(scored.token_rewards[1:n + 1])}
