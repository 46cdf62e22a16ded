"""Rotary position embedding for the unfused path with its cos/sin tables computed once.

Megatron-Core's unfused RoPE (`rope_utils._apply_rotary_pos_emb_bshd`, the local layer spec's
path) takes the angles and computes cos, sin, two scalings, two casts, a split, a negation and
two concatenations on every call: twice per layer per forward. A decode step rotates one
position for a few rows, so those dozen small ops cost more than the rotation itself (18% of
a decode step on the tiny model, measured with cProfile in benchmarks/rollout_throughput.py's
single-turn setup). Here cos and a sign-folded sin are kept per angle table, and the rotation
is four ops:

    t * cos + roll(t, d/2) * sin'     where sin' = [-sin[:d/2], sin[d/2:]]

which is Megatron's `t * cos + cat(-t2, t1) * sin` term by term (a negation moves from one
factor to the other; IEEE products are sign-symmetric): the same bits, forward and backward.

The angle tables are views of the tensor that `RotaryEmbedding.forward` keeps in its
`lru_cache`, so a view is recognized by its address, shape and strides; each cached entry holds
the view itself, so its memory cannot be freed and reused under the same key. Everything this
path does not cover (TE's fused kernel, packed sequences, interleaved or partial rotation, MLA)
goes to Megatron's own function unchanged."""

from __future__ import annotations

import torch

_MAX_ENTRIES = 8192  # angle tables of every position of a few sequence lengths and dtypes
_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_megatron_apply = None


def cos_sin(freqs: torch.Tensor, dtype: torch.dtype, mscale: float = 1.0):
    """cos and the sign-folded sin of an angle table (shape of `freqs`), in `dtype`; computed
    once per table."""
    key = (freqs.data_ptr(), freqs.device, tuple(freqs.shape), freqs.stride(), dtype, mscale)
    hit = _tables.get(key)
    if hit is None:
        if len(_tables) >= _MAX_ENTRIES:
            _tables.clear()
        half = freqs.shape[-1] // 2
        cos = (torch.cos(freqs) * mscale).to(dtype)
        sin = (torch.sin(freqs) * mscale).to(dtype)
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        hit = _tables[key] = (cos, signed, freqs)
    return hit[0], hit[1]


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0,
                         cp_group=None):
    """`megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb`, with the
    cos/sin tables cached on the unfused [s, b, heads, d] path."""
    if (config.apply_rope_fusion or cu_seqlens is not None or config.rotary_interleaved
            or config.multi_latent_attention or freqs.shape[-1] != t.shape[-1]
            or freqs.requires_grad):
        return _megatron_apply(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale,
                               cp_group=cp_group)
    cos, sin = cos_sin(freqs, t.dtype, mscale)
    return rotate(t, cos, sin)


def rotate(t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE of all of t's last dimension, with `cos_sin`'s tables."""
    return t * cos + t.roll(t.shape[-1] // 2, dims=-1) * signed_sin


def install() -> None:
    """Route Megatron's attention (the module that applies RoPE to queries and keys) through
    `apply_rotary_pos_emb` above. Idempotent."""
    global _megatron_apply
    from megatron.core.transformer import attention

    if attention.apply_rotary_pos_emb is apply_rotary_pos_emb:
        return
    _megatron_apply = attention.apply_rotary_pos_emb
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
