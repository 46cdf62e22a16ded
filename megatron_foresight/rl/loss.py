"""FC-RL's policy loss: the clipped importance ratio per token, KL to a frozen reference,
truncated importance sampling against the rollout engine's log-probabilities, and the
aggregation over tokens. Every function takes [N, T] tensors with a loss mask that is 1 on the
agent's own tokens and 0 on prompt, environment and padding tokens: those get no gradient."""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k3")
AGGREGATIONS = ("token", "sequence")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3"
                ) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's
    estimators): k1 = log p - log q (unbiased, can be negative); k3 = q/p - 1 - log(q/p)
    (unbiased, never negative, lower variance)."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator is one of {KL_ESTIMATORS}, got {kind!r}")
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    return torch.exp(-log_ratio) - 1 + log_ratio


def masked_sums(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) whose ratio is the aggregated loss: `token` sums every masked token and
    counts them; `sequence` sums each sequence's own mean and counts the sequences with tokens
    (each episode weighs the same). The train loop adds both up over microbatches and ranks."""
    if how not in AGGREGATIONS:
        raise ValueError(f"loss aggregation is one of {AGGREGATIONS}, got {how!r}")
    mask = mask.to(per_token.dtype)
    if how == "token":
        return (per_token * mask).sum(), mask.sum()
    tokens = mask.sum(-1)
    has_tokens = (tokens > 0).to(per_token.dtype)
    return ((per_token * mask).sum(-1) / tokens.clamp(min=1) * has_tokens).sum(), has_tokens.sum()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token") -> torch.Tensor:
    """Mean over the masked tokens: `token` weighs every token in the batch equally, `sequence`
    averages within each sequence first, then over sequences (each episode weighs the same)."""
    total, count = masked_sums(per_token, mask, how)
    return total / count.clamp(min=1)


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                         cap: float = 2.0) -> torch.Tensor:
    """min(pi_old / pi_rollout, cap) per token: corrects for rollouts drawn by a different
    engine (or precision) than the one that recomputes the log-probabilities (no gradient)."""
    return torch.exp(old_logprobs - rollout_logprobs).clamp(max=cap).detach()


def per_token_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                          advantages: torch.Tensor, clip_low: float = 0.2,
                          clip_high: float = 0.2, ref_logprobs: torch.Tensor | None = None,
                          kl_coef: float = 0.0, kl_kind: str = "k3",
                          is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate per token, plus `kl_coef` x KL to the reference:
    -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) [x is_weights] + kl_coef * kl
    with ratio = exp(logprobs - old_logprobs). Returns it and, per token and detached, whether
    the clip was active, the ratio, and the KL estimate (when used)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    parts = {"clipped": (clipped < unclipped).float().detach(), "ratio": ratio.detach()}
    if ref_logprobs is not None and kl_coef:
        kl = kl_estimate(logprobs, ref_logprobs, kl_kind)
        per_token = per_token + kl_coef * kl
        parts["kl"] = kl.detach()
    return per_token, parts


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                kl_kind: str = "k3", aggregation: str = "token",
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """`per_token_policy_loss` aggregated over the mask; metrics: clip fraction, mean and max
    ratio, and the KL when used (detached)."""
    mask = mask.float()
    per_token, parts = per_token_policy_loss(logprobs, old_logprobs, advantages, clip_low,
                                             clip_high, ref_logprobs, kl_coef, kl_kind,
                                             is_weights)
    loss = aggregate(per_token, mask, aggregation)
    metrics = {"clip_fraction": aggregate(parts["clipped"], mask, "token"),
               "ratio_mean": aggregate(parts["ratio"], mask, "token"),
               "ratio_max": (parts["ratio"] * mask).max()}
    if "kl" in parts:
        metrics["kl"] = aggregate(parts["kl"], mask, "token")
    return loss, metrics


def per_token_value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor,
                         clip: float | None = 0.2) -> torch.Tensor:
    """PPO's critic loss per token: 0.5 x max((v - R)^2, (clip(v, v_old +- clip) - R)^2)."""
    err = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return 0.5 * err


def value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor,
               mask: torch.Tensor, clip: float | None = 0.2) -> torch.Tensor:
    """PPO's critic loss, the mean of `per_token_value_loss` over the mask."""
    return aggregate(per_token_value_loss(values, returns, old_values, clip), mask, "token")
