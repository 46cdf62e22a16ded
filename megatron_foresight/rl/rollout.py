"""From played episodes to what the policy is trained on.

`score_rewards` scores every weighted reward term (`rl.rewards`) of each episode (per episode)
or of each of its turns (per turn), finds the tokens of each turn's blocks that terms are
credited to (`credit_spans`), and places each weighted reward on the last token that earned it
(`ScoredEpisode.token_rewards`, what PPO's critic bootstraps over). The RL algorithm
(`rl.algorithms`) turns those into per-token advantages.

`to_sample` lays an episode out as one training sequence: the ids the policy sampled,
unchanged (token in, token out), with a loss mask that is 1 exactly on them; `align` lays any
per-token quantity of the episode out the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from megatron_foresight.inference.agent import EpisodeRecord
from megatron_foresight.foresight.format import observation_content
from megatron_foresight.foresight.formats import FORMATS, ForesightFormat
from megatron_foresight.rl.rewards import (
    REWARD_TERMS, RewardSettings, RewardTerm, TurnContext, credit_spans,
)


@dataclass
class ScoredTurn:
    rewards: dict[str, float]
    """Each per-turn term's reward, unweighted."""
    spans: dict[str, tuple[int, int]]
    """Token ranges [start, end) of the turn's blocks, relative to the turn's ids."""


@dataclass
class ScoredEpisode:
    record: EpisodeRecord
    turns: list[ScoredTurn]
    episode_rewards: dict[str, float]
    """Each per-episode term's reward, unweighted."""
    rewards: dict[str, float] = field(default_factory=dict)
    """What is logged: each term (a per-turn term averaged over the turns) and the weighted
    `total`."""
    token_rewards: torch.Tensor | None = None
    """[len(record.ids)] the weighted rewards, each on the last token that earned it: a turn's
    whole-turn terms on its last token, then each block term on its block's last token (the
    turn's last without the block), and the episode's terms on its last agent token."""


def active_terms(weights: Mapping[str, float]) -> list[tuple[RewardTerm, float]]:
    """The weighted terms in registration order (the order every sum over them takes)."""
    return [(term, weights[name]) for name, term in REWARD_TERMS.items() if name in weights]


def _turn_context(record: EpisodeRecord, k: int, fmt: ForesightFormat) -> TurnContext:
    later = (record.observed(k), *(observation_content(t.observation)
                                   for t in record.turns[k + 1:] if t.observation is not None))
    return TurnContext(record.turns[k].text, fmt.parse_turn_lenient(record.turns[k].text),
                       record.observed(k), later, record.success)


def score_rewards(records: Sequence[EpisodeRecord], weights: Mapping[str, float], tokenizer,
                  settings: RewardSettings = RewardSettings(),
                  fmt: ForesightFormat = FORMATS["v1"]) -> list[ScoredEpisode]:
    """Rewards of every weighted term, per episode or per turn, and where they were earned;
    turns are read in the foresight format `fmt`."""
    terms = active_terms(weights)
    out = []
    for record in records:
        turns = []
        for k, turn in enumerate(record.turns):
            ctx = _turn_context(record, k, fmt)
            turns.append(ScoredTurn({t.name: t.score(ctx, settings) for t, _ in terms
                                     if t.scope == "turn"},
                                    credit_spans(tokenizer, turn.ids, turn.text)))
        scored = ScoredEpisode(record, turns, {t.name: t.score(record, settings)
                                               for t, _ in terms if t.scope == "episode"})
        scored.token_rewards = _token_rewards(scored, terms)
        scored.rewards = _logged(scored, terms)
        out.append(scored)
    return out


def _token_rewards(scored: ScoredEpisode, terms) -> torch.Tensor:
    record = scored.record
    earned = torch.zeros(len(record.ids))
    for turn, st in zip(record.turns, scored.turns):
        a, n = turn.start, len(turn.ids)
        if not n:
            continue
        for term, w in terms:
            if term.credit == "turn":
                earned[a + n - 1] += w * st.rewards[term.name]
        for term, w in terms:
            if term.scope == "turn" and term.credit != "turn":
                end = a + st.spans[term.credit][1] - 1 if term.credit in st.spans else a + n - 1
                earned[end] += w * st.rewards[term.name]
    last = record.turns[-1] if record.turns else None
    if last is not None and last.ids:
        for term, w in terms:
            if term.scope == "episode":
                earned[last.start + len(last.ids) - 1] += w * scored.episode_rewards[term.name]
    return earned


def _logged(scored: ScoredEpisode, terms) -> dict[str, float]:
    rewards = dict(scored.episode_rewards)
    for term, _ in terms:
        if term.scope == "turn":
            values = [st.rewards[term.name] for st in scored.turns]
            rewards[term.name] = sum(values) / len(values) if values else 0.0
    rewards["total"] = sum(w * rewards[term.name] for term, w in terms)
    return rewards


def agent_tokens(record: EpisodeRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """[len(record.ids)] each: 1 on the tokens the agent sampled (0 on prompt and
    environment), and the sampler's log-probability of each of them."""
    mask, logprobs = torch.zeros(len(record.ids)), torch.zeros(len(record.ids))
    for turn in record.turns:
        mask[turn.start:turn.start + len(turn.ids)] = 1
        logprobs[turn.start:turn.start + len(turn.ids)] = torch.tensor(turn.logprobs)
    return mask, logprobs


def align(per_token: torch.Tensor, seq_length: int, value=0) -> torch.Tensor:
    """A per-token quantity of an episode ([len(ids)]) laid out as `to_sample` lays out the
    episode: position j is scored on ids[j + 1], so it holds per_token[j + 1]; padded (or cut)
    to `seq_length`."""
    n = min(len(per_token) - 1, seq_length)
    full = torch.full((seq_length,), value, dtype=per_token.dtype)
    full[:n] = per_token[1:n + 1]
    return full


def to_sample(scored: ScoredEpisode, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One episode as a next-token training sequence of `seq_length`: position j reads ids[j]
    and is scored on ids[j + 1], so the loss mask, rollout log-probs and rewards are those of
    ids[1:]. Padding (and anything past the sequence) carries no loss. The algorithm adds the
    advantages (`align`ed the same way)."""
    ids = torch.tensor(scored.record.ids, dtype=torch.long)
    mask, logprobs = agent_tokens(scored.record)
    n = min(len(ids) - 1, seq_length)
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    tokens[:n] = ids[:n]
    return {"tokens": tokens, "labels": align(ids, seq_length, pad_id),
            "position_ids": torch.arange(seq_length), "loss_mask": align(mask, seq_length),
            "rollout_logprobs": align(logprobs, seq_length),
            "token_rewards": align(scored.token_rewards, seq_length)}
