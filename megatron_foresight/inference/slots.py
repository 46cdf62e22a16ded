"""A slot KV cache for continuous batching, and the self-attention that reads and writes it.

Megatron's static inference context shares one sequence offset among all rows: every row of a
batch is at the same position, so a row that finishes early idles until the batch ends, and a
new sequence cannot join it. Here each of S slots has its own length: a forward may prefill a few
slots (new tokens at each slot's own positions) or decode one token for any subset of slots,
and a slot freed by one episode is reused by the next without touching the others.

`SlotContext` is the inference context handed to `GPTModel.forward`; Megatron reads only a few
of its attributes (`max_sequence_length` for the RoPE table, `is_static_batching()` and
`materialize_only_last_token_logits`, so only the last position reaches the output layer), and
`SlotSelfAttention` does the rest when it sees this context. The engine (`inference.continuous`)
describes each forward with `SlotContext.begin`.

Shapes: S slots, B rows in this forward, N new tokens per row (left-padded), T keys read (the
longest row after this forward), M max_sequence_length, G key/value groups and H query heads per
TP rank, D head dim. Cache per layer: keys [S, G, D, M] (stored transposed, so that a decode
step's query-key product reads them as one matrix per group, without a transpose), values
[S, G, M, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.transformer.attention import SelfAttention

from megatron_foresight.errors import UsageError
from megatron_foresight.models import rope


class SlotContext(BaseInferenceContext):
    """Per-layer K/V caches of `slots` sequences of up to `max_sequence_length` tokens each.
    Caches are allocated by each layer on its first write (a pipeline stage holds only its own
    layers'), in the dtype and on the device of that layer's keys."""

    def __init__(self, slots: int, max_sequence_length: int):
        super().__init__(materialize_only_last_token_logits=True)
        self.slots = slots
        self.max_sequence_length = max_sequence_length
        self.lengths = [0] * slots
        """Tokens cached per slot; the engine advances it after each forward."""
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.step: _Step | None = None
        self.rotary_pos_emb: torch.Tensor | None = None
        """The RoPE angle table [M, 1, 1, rot] the layers last received (`inference.fused`
        decodes with it)."""

    def is_static_batching(self) -> bool:
        # Megatron then keeps only the last position's hidden state for the output layer; with
        # left padding that is every row's last real token.
        return True

    def is_decode_only(self) -> bool:
        return self.step is not None and self.step.queries == 1

    def begin(self, slots: list[int], new: list[int], device) -> None:
        """Describe the next forward: row b appends new[b] tokens to slot slots[b], its tokens
        left-padded to max(new)."""
        self.step = _Step(slots, [self.lengths[s] for s in slots], new, device)

    def end(self) -> None:
        for s, n in zip(self.step.slots, self.step.new):
            self.lengths[s] += n
        self.step = None

    def copy_prefix(self, source: int, target: int) -> None:
        """Give slot `target` slot `source`'s cache (rows with the same prompt: prefilled once)."""
        n = self.lengths[source]
        for k, v in self.kv.values():
            k[target, ..., :n] = k[source, ..., :n]
            v[target, :, :n] = v[source, :, :n]
        self.lengths[target] = n

    def cache(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s (keys [S, G, D, M], values [S, G, M, D])."""
        if layer not in self.kv:
            _, _, groups, dim = key.shape
            M = self.max_sequence_length
            self.kv[layer] = (key.new_zeros(self.slots, groups, dim, M),
                              key.new_zeros(self.slots, groups, M, dim))
        return self.kv[layer]


class StepCache:
    """How a step reads and writes the caches; a step sets `view` (a slice of contiguous
    slots, or None), `slot_B`, `keys`, `write_slot` and `write_pos`."""

    def key_rows(self, k_cache: torch.Tensor) -> torch.Tensor:
        """This step's slots' first `keys` keys, [B, G, D, T]."""
        return k_cache[self._rows, ..., :self.keys]

    def value_rows(self, v_cache: torch.Tensor) -> torch.Tensor:
        """This step's slots' first `keys` values, [B, G, T, D]."""
        return v_cache[self._rows, :, :self.keys]

    @property
    def _rows(self):
        # contiguous slots read the cache as a view; others are gathered (busy rows only)
        return self.view if self.view is not None else self.slot_B

    def write(self, k_cache, v_cache, k_nGD: torch.Tensor, v_nGD: torch.Tensor) -> None:
        """Store the new tokens' keys and values ([n, G, D], in `write_slot` order)."""
        k_cache[self.write_slot, :, :, self.write_pos] = k_nGD
        v_cache[self.write_slot, :, self.write_pos] = v_nGD


class _Step(StepCache):
    """What one forward does, computed once and read by every layer."""

    def __init__(self, slots: list[int], lengths: list[int], new: list[int], device):
        self.slots, self.new = slots, new
        B, N = len(slots), max(new)
        self.queries = N
        self.slot_B = torch.tensor(slots, device=device)
        first = slots[0]
        self.view = slice(first, first + B) if slots == list(range(first, first + B)) else None
        self.cos_sin: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        start = [length + n for length, n in zip(lengths, new)]
        self.keys = max(start)
        start_B = torch.tensor(start, device=device)
        padded = min(new) < N
        # a decode step (one token for every row) needs no offsets
        offset_N = torch.arange(N, device=device) - N if N > 1 or padded else None
        self.pos_BN = (start_B - 1)[:, None] if offset_N is None else \
            start_B[:, None] + offset_N  # < length: a padded position
        self.valid_BN = offset_N >= -torch.tensor(new, device=device)[:, None] if padded \
            else None
        ragged = N > 1 or min(start) != max(start)
        # a padded query sees key 0 only, so no softmax row is empty; its output is never used
        self.keep_BNT = torch.arange(self.keys, device=device) <= \
            self.pos_BN.clamp(min=0)[..., None] if ragged else None
        if self.valid_BN is None:
            self.write_slot = self.slot_B if N == 1 else self.slot_B.repeat_interleave(N)
            self.write_pos = self.pos_BN.reshape(-1)
        else:
            self.write_slot = self.slot_B[:, None].expand(B, N)[self.valid_BN]
            self.write_pos = self.pos_BN[self.valid_BN]

    def new_tokens(self, x_NBGD: torch.Tensor) -> torch.Tensor:
        """The real (unpadded) tokens' rows of x, [valid, G, D], in `write_slot` order."""
        x_BNGD = x_NBGD.transpose(0, 1)
        return x_BNGD.reshape(-1, *x_BNGD.shape[2:]) if self.valid_BN is None \
            else x_BNGD[self.valid_BN]


def unsupported_by_slots(config) -> list[str]:
    """What of a model's TransformerConfig the slot cache does not implement (empty: it can
    run the model)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    c = config
    return [name for name, bad in (
        ("rotary_interleaved", c.rotary_interleaved), ("no_rope_freq", c.no_rope_freq),
        ("attention_output_gate", c.attention_output_gate), ("flash_decode", c.flash_decode),
        ("context_parallel_size > 1", c.context_parallel_size > 1),
        ("window_size", c.window_size is not None),
        ("softmax_type", c.softmax_type != "vanilla"),
        ("yarn RoPE", _yarn_get_concentration_factor_from_config(c) != 1.0),
    ) if bad]


class SlotSelfAttention(SelfAttention):
    """Megatron's `SelfAttention` (same weights, same checkpoint keys) that, given a
    `SlotContext`, applies RoPE at each row's own positions, writes the new keys and values
    into the row's slot and attends over that slot; with any other context, or none, it is
    Megatron's. Tensor parallel: the heads are this rank's (as Megatron splits them) and
    `linear_proj` reduces over the TP group as usual."""

    def forward(self, hidden_states, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, **kwargs):
        if not isinstance(inference_context, SlotContext) or self.training:
            return super().forward(hidden_states, attention_mask, key_value_states=key_value_states,
                                   inference_context=inference_context,
                                   rotary_pos_emb=rotary_pos_emb, **kwargs)
        self._check_supported(rotary_pos_emb)
        step = inference_context.step
        query, key, value = self.get_query_key_value_tensors(hidden_states)  # [N, B, heads, D]
        if rotary_pos_emb is not None:
            inference_context.rotary_pos_emb = rotary_pos_emb
            cos, sin = self._angles(inference_context, step, rotary_pos_emb, query.dtype)
            query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        k_cache, v_cache = inference_context.cache(self.layer_number, key)
        step.write(k_cache, v_cache, step.new_tokens(key), step.new_tokens(value))
        out = _attend(query, step.key_rows(k_cache), step.value_rows(v_cache), step.keep_BNT,
                      self.config.softmax_scale or query.size(-1) ** -0.5)
        return self.linear_proj(out)

    def _check_supported(self, rotary_pos_emb) -> None:
        unsupported = unsupported_by_slots(self.config)
        if isinstance(rotary_pos_emb, tuple) or (rotary_pos_emb is not None
                                                 and rotary_pos_emb.shape[1] != 1):
            unsupported.append("per-sample RoPE (mrope)")
        if unsupported:
            raise UsageError(f"the slot KV cache (continuous batching) does not support "
                             f"{', '.join(unsupported)}; play episodes with continuous=False")

    @staticmethod
    def _angles(context: SlotContext, step: _Step, freqs, dtype):
        """cos, sin at each query's position, [N, B, 1, rot]; shared by the layers."""
        if dtype not in step.cos_sin:
            cos_MR, sin_MR = (x[:, 0, 0] for x in rope.cos_sin(freqs, dtype))  # [M, rot]
            pos_NB = step.pos_BN.t().clamp(min=0)
            step.cos_sin[dtype] = (cos_MR[pos_NB][:, :, None], sin_MR[pos_NB][:, :, None])
        return step.cos_sin[dtype]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved RoPE on the first `rot` channels; the rest pass through."""
    rot = cos.size(-1)
    if rot == x.size(-1):
        return rope.rotate(x, cos, sin)
    x, rest = x[..., :rot], x[..., rot:]
    return torch.cat((rope.rotate(x, cos, sin), rest), dim=-1)


def _attend(q_NBHD, k_BGDT, v_BGTD, keep_BNT, scale: float) -> torch.Tensor:
    """Each row's queries over its own slot's keys, [N, B, H * D]. One query per row: two
    matmuls over the cache as it lies (see `models.attention.SDPADotProductAttention._decode`);
    several: SDPA with the mask (grouped-query attention passed through, not expanded), on the
    keys made contiguous (SDPA on the CPU is several times slower on a transposed view)."""
    N, B, H, D = q_NBHD.shape
    G = k_BGDT.size(1)
    if N == 1:
        q_BGRD = q_NBHD[0].reshape(B, G, H // G, D)
        scores_BGRT = torch.matmul(q_BGRD, k_BGDT) * scale
        if keep_BNT is not None:
            scores_BGRT = scores_BGRT.masked_fill(~keep_BNT[:, None], float("-inf"))
        probs = scores_BGRT.softmax(-1, dtype=torch.float32).to(q_NBHD.dtype)
        return torch.matmul(probs, v_BGTD).reshape(1, B, H * D)
    out_BHND = F.scaled_dot_product_attention(
        q_NBHD.permute(1, 2, 0, 3), k_BGDT.transpose(-1, -2).contiguous(), v_BGTD,
        attn_mask=None if keep_BNT is None else keep_BNT[:, None], scale=scale,
        enable_gqa=G != H)
    return out_BHND.permute(2, 0, 1, 3).reshape(N, B, H * D)
