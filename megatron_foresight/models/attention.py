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
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias need Transformer Engine "
                             "attention (or model.local_core_attention: megatron for bias)")
        sq, b, heads, d = query.shape
        sk = key.size(0)
        if sq == 1 and not self.training:
            return self._decode(query, key, value, attention_mask)
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
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout and \
                not self.config.sequence_parallel else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1))
        # [b, h, sq, d] -> [sq, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)

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

