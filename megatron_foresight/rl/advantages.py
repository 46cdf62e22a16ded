"""Advantages for FC-RL as pure functions: GRPO's group-normalized rewards, RLOO's
leave-one-out baseline, PPO's generalized advantage estimation and whitening
(`rl.algorithms` lays them out over each term's tokens).

Shapes: N episodes (P prompts x G samples each, grouped by prompt), T tokens per sequence."""

from __future__ import annotations

from typing import Sequence

import torch


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards laid out group by group as [groups, G] (float)."""
    rewards = rewards.float()
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of "
                         f"{group_size}")
    return rewards.view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) [/ (std of its group + eps)] for rewards laid out group by group
    (episodes [0, G) share a prompt, then [G, 2G), ...). The std is the unbiased sample std,
    as in the GRPO paper; a group whose rewards are all equal gets zero advantages."""
    grouped = _grouped(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def groups_with_signal(rewards: Sequence[float], group_size: int) -> float:
    """The share of groups (G consecutive rewards, one task each) whose rewards are not all
    equal: the groups a group baseline learns anything from. With the task reward, a policy
    whose samples all fail (or all succeed) gives GRPO no task signal at all."""
    if not rewards:
        raise ValueError(f"no rewards to split into groups of {group_size}")
    grouped = _grouped(torch.tensor(rewards), group_size)
    return (grouped.amax(dim=1) != grouped.amin(dim=1)).float().mean().item()


def group_baseline(values: Sequence[float], groups: Sequence[int], normalize_std: bool = True,
                   eps: float = 1e-6) -> list[float]:
    """GRPO's normalization for per-turn rewards: each value minus the mean of the values that
    share its group (the prompt), divided by their std when asked. Groups may differ in size
    (episodes of one prompt take different numbers of turns)."""
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values but {len(groups)} group labels")
    by_group: dict[int, list[float]] = {}
    for v, g in zip(values, groups):
        by_group.setdefault(g, []).append(float(v))
    stats = {}
    for g, vs in by_group.items():
        mean = sum(vs) / len(vs)
        std = (sum((v - mean) ** 2 for v in vs) / (len(vs) - 1)) ** 0.5 if len(vs) > 1 else 0.0
        stats[g] = (mean, std)
    out = []
    for v, g in zip(values, groups):
        mean, std = stats[g]
        out.append((v - mean) / (std + eps) if normalize_std and len(by_group[g]) > 1
                   else v - mean)
    return out


def rloo_baseline(values: Sequence[float], groups: Sequence[int]) -> list[float]:
    """REINFORCE leave-one-out: each value minus the mean of the other values of its group
    (groups may differ in size); 0 for a value alone in its group."""
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values but {len(groups)} group labels")
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for v, g in zip(values, groups):
        sums[g] = sums.get(g, 0.0) + float(v)
        counts[g] = counts.get(g, 0) + 1
    return [float(v) - (sums[g] - float(v)) / (counts[g] - 1) if counts[g] > 1 else 0.0
            for v, g in zip(values, groups)]


def whiten(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Advantages shifted and scaled to mean 0 and std 1 over the masked tokens (zero off the
    mask): PPO's normalization over a step's agent tokens."""
    n = mask.sum().clamp(min=1)
    mean = (advantages * mask).sum() / n
    std = (((advantages - mean) * mask) ** 2).sum().div(n).sqrt()
    return (advantages - mean) / (std + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the agent's tokens, [N, T] each.

    `rewards[n, t]` is the reward given at token t, `values[n, t]` the critic's estimate before
    token t, `mask[n, t]` 1 on tokens the agent wrote. Environment tokens (mask 0) are skipped:
    the step after an agent token is the next agent token, so an observation does not split
    the bootstrapping. The value after the last agent token is 0 (the episode ended).
    Returns (advantages, returns), zero off the mask."""
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    n, t_len = rewards.shape
    adv = torch.zeros(n, t_len, device=rewards.device)
    next_value = torch.zeros(n, device=rewards.device)
    running = torch.zeros(n, device=rewards.device)
    for t in reversed(range(t_len)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        adv[:, t] = step * m
        running = torch.where(m > 0, step, running)
        next_value = torch.where(m > 0, values[:, t], next_value)
    returns = (adv + values) * mask
    return adv, returns
