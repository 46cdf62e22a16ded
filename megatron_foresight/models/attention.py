"""Core attention for the local (non Transformer Engine) layer spec, on torch's fused
`scaled_dot_product_attention`.

Megatron-Core's own local `DotProductAttention` materializes the [b, heads, s, s] score tensor
and runs scale, mask fill, softmax and dropout as separate ops, then copies score-sized
gradients through each in the backward. On the CPU that made the whole training step about 30%
slower than Hugging Face's Llama (which uses SDPA); measured in benchmarks/train_throughput.py.
This module keeps `DotProductAttention`'s construction (head bookkeeping per TP rank, softmax
scale, checkpoint keys) and replaces only the computation. It is chosen through the layer spec
(`model.local_core_attention: sdpa`), the way the Transformer Engine spec chooses TE's kernel.

Shapes follow Megatron: query [sq, b, heads, d], key/value [sk, b, groups, d] (grouped-query
attention is passed through to SDPA, not expanded), output [sq, b, heads * d].
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.config.softmax_type != "vanilla" or self.config.window_size is not None:
            raise ValueError("SDPADotProductAttention supports vanilla softmax without a "
                             "sliding window; use model.local_core_attention: megatron")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("attention bias needs Transformer Engine attention (or "
                             "model.local_core_attention: megatron)")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        sq, b, heads, d = query.shape
        sk = key.size(0)
        if sq == 1 and not self.training:
            return self._decode(query, key, value, attention_mask)
        dropout = self.attention_dropout.p if self.training else 0.0
        if attention_mask is not None and sq == sk and self.training \
                and attention_mask.shape[-2:] == (sq, sk) and attention_mask.size(0) in (1, b):
            documents = document_spans(attention_mask)
            if documents is not None:
                return self._by_document(query, key, value, documents, dropout)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # Megatron marks positions to hide; SDPA marks ones to keep
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                is_causal = True
            elif sq > 1:  # decoding with a KV cache: the queries are the last sq of sk positions
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        with self._dropout_rng(dropout):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1))
        # [b, h, sq, d] -> [sq, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)

    def _dropout_rng(self, dropout: float):
        if dropout and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _packed(self, query, key, value, packed_seq_params):
        """A packed sequence (THD: Megatron has squeezed the batch dimension, query [t, heads,
        d]) whose documents `cu_seqlens` bounds, each attending causally to itself: what
        Transformer Engine computes for the same parameters, here on the per-document path."""
        p = packed_seq_params
        if p.qkv_format != "thd" or p.cu_seqlens_q_padded is not None \
                or p.cu_seqlens_kv_padded is not None \
                or not torch.equal(p.cu_seqlens_q, p.cu_seqlens_kv):
            raise ValueError("SDPA attention takes packed sequences in THD format with the same "
                             "unpadded boundaries for queries and keys")
        cu = p.cu_seqlens_q.tolist()
        dropout = self.attention_dropout.p if self.training else 0.0
        out = self._by_document(query[:, None], key[:, None], value[:, None],
                                [list(zip(cu[:-1], cu[1:]))], dropout)
        return out[:, 0]  # [t, heads * d]

    def _by_document(self, query, key, value, documents, dropout):
        """Attention under a per-document mask (`data.document_masks`), one document at a
        time with SDPA's causal kernel: the same result as the explicit mask (up to float
        rounding). The explicit mask leaves SDPA's causal kernel and cost FE-SFT's step 17%
        of its tokens/s at d692f67 (before this path); this path costs none there and 9% on
        WM-AMT's shorter documents (2 CPU cores, benchmarks/train_throughput.py --vs; not
        measured on a GPU, where a Python loop over documents may cost more).
        It is not faster than the causal sample: SDPA's CPU backward costs about the same per
        token at 512 as at 1,024 tokens, and padding the documents into a few batched calls
        (one per length bucket) was slower still, gathers included."""
        sq, b, heads, d = query.shape
        gqa = key.size(2) != heads
        rows = []
        # unbind and split, not slicing: each slice's gradient would be a zero-filled tensor
        # of the whole input, summed over slices (that cost more than the attention saved)
        with self._dropout_rng(dropout):
            for r, (q, k, v) in enumerate(zip(query.unbind(1), key.unbind(1), value.unbind(1))):
                spans = documents[r if len(documents) > 1 else 0]  # a [1, 1, s, s] mask: all rows
                lengths = [s1 - s0 for s0, s1 in spans]
                parts = [F.scaled_dot_product_attention(
                    qd.permute(1, 0, 2)[None], kd.permute(1, 0, 2)[None],
                    vd.permute(1, 0, 2)[None], dropout_p=dropout, is_causal=True,
                    scale=self.softmax_scale, enable_gqa=gqa)[0].permute(1, 0, 2)
                    for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
                rows.append(torch.cat(parts) if len(parts) > 1 else parts[0])  # [s, h, d]
        return torch.stack(rows, dim=1).reshape(sq, b, heads * d)

    def _decode(self, query, key, value, attention_mask):
        """One query per row against a KV cache (a decode step): two batched matmuls over the
        cache as it lies ([sk, b, groups, d], strided), each group's query heads together.
        Twice as fast as SDPA here, which copies the strided cache and runs its tiled kernel
        for a single query (benchmarks/rollout_throughput.py). Same result up to float
        rounding (~1e-7)."""
        _, b, heads, d = query.shape
        groups = key.size(2)
        q_bgrd = query[0].reshape(b, groups, heads // groups, d)
        scores_bgrk = torch.matmul(q_bgrd, key.permute(1, 2, 3, 0)) * self.softmax_scale
        if attention_mask is not None:  # [b, 1, 1, sk], True where hidden
            scores_bgrk = scores_bgrk.masked_fill(attention_mask, float("-inf"))
        probs = scores_bgrk.softmax(-1, dtype=torch.float32).to(query.dtype)
        out_bgrd = torch.matmul(probs, value.permute(1, 2, 0, 3))
        return out_bgrd.reshape(1, b, heads * d)


_last_spans: tuple | None = None  # (weak reference to the mask, its address, version, spans)


def document_spans(attention_mask: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """The documents of each row of a per-document causal mask (Megatron's reset attention
    mask: [b or 1, 1, s, s], True where hidden), as `(start, end)` spans per batch row; None
    when the mask is anything else (a key-padding mask, a custom mask), which then goes to
    SDPA as it is. Checked in full, so the spans path never computes another attention than
    the mask (a left-padded prefill mask whose pads see themselves is per-document: each pad
    is a one-token document). Every layer of a forward gets the same mask (activation
    recomputation gives a detached alias of it: same storage, same version counter): it is
    read once per forward. The last mask is remembered by a weak reference, so nothing is held
    after it dies, and an in-place change (a new version) reads it again."""
    global _last_spans
    key = (attention_mask.data_ptr(), tuple(attention_mask.shape), attention_mask.stride(),
           attention_mask._version)
    if _last_spans is not None and _last_spans[0]() is not None and _last_spans[1] == key:
        return _last_spans[2]
    spans = None
    if attention_mask.dim() == 4 and attention_mask.size(1) == 1 \
            and attention_mask.size(2) == attention_mask.size(3) \
            and attention_mask.dtype == torch.bool:
        hidden_bSS = attention_mask[:, 0]
        s = hidden_bSS.size(-1)
        pos = torch.arange(s, device=attention_mask.device)
        starts_bS = torch.ones(hidden_bSS.shape[:2], dtype=torch.bool,
                               device=attention_mask.device)
        starts_bS[:, 1:] = hidden_bSS[:, pos[1:], pos[:-1]]  # cannot see the token before it
        doc_bS = starts_bS.cumsum(1)
        expected_bSS = (doc_bS[:, :, None] != doc_bS[:, None, :]) | (pos[None, :] > pos[:, None])
        if torch.equal(hidden_bSS, expected_bSS):
            spans = []
            for row in starts_bS.tolist():
                bounds = [i for i, start in enumerate(row) if start] + [s]
                spans.append(list(zip(bounds[:-1], bounds[1:])))
    _last_spans = (weakref.ref(attention_mask), key, spans)
    return spans
