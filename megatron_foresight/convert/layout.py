"""Where each Hugging Face tensor lives in a Megatron distributed checkpoint, and how it is laid
out there. Pure functions on tensors; no I/O.

A Megatron distributed checkpoint stores every tensor in its tensor-parallel size 1 layout,
whatever layout saved it (dist_checkpointing records each shard's place in that global tensor),
with the layers stacked along a leading axis. Keys are those of the Transformer Engine spec; the
local spec maps its own names onto them when it saves. Two tensors differ from Hugging Face's:

* `linear_qkv`: query, key and value projections fused, grouped by key/value head: for each of
  the G groups, its H/G query heads, then its key head, then its value head (rows of head_dim).
* `linear_fc1`: the SwiGLU gate and up projections stacked, gate first.

RoPE needs no permutation: Megatron (rotary_interleaved=False) and transformers both rotate
halves of each head.
"""

from __future__ import annotations

import torch

from megatron_foresight.config import ModelConfig

LAYERS = "decoder.layers."
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"

# Megatron key (under decoder.layers.) -> Hugging Face name (under model.layers.N.) for the
# tensors that map one to one.
_DIRECT = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
QKV_WEIGHT = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
FC1 = "mlp.linear_fc1.weight"


def layer_keys(m: ModelConfig) -> list[str]:
    """Megatron keys of one decoder layer (without the `decoder.layers.` prefix)."""
    return [*_DIRECT, QKV_WEIGHT, *([QKV_BIAS] if m.add_qkv_bias else []), FC1]


def hf_layer_names(m: ModelConfig) -> list[str]:
    """Hugging Face names of one layer's tensors (without `model.layers.N.`), in file order."""
    qkv = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]
    if m.add_qkv_bias:
        qkv += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    return ["input_layernorm.weight", *qkv, "self_attn.o_proj.weight",
            "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight"]


def _head_shape(m: ModelConfig) -> tuple[int, int, int]:
    head_dim = m.head_dim
    groups = m.query_groups
    return groups, m.num_attention_heads // groups, head_dim


def split_qkv(fused: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Megatron's fused QKV (weight or bias) -> (q, k, v) in Hugging Face's layout."""
    groups, per_group, head_dim = _head_shape(m)
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """(q, k, v) in Hugging Face's layout -> Megatron's fused QKV."""
    groups, per_group, head_dim = _head_shape(m)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, per_group * head_dim, *rest),
                         k.reshape(groups, head_dim, *rest),
                         v.reshape(groups, head_dim, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def layer_to_hf(tensors: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """One layer, Megatron keys -> Hugging Face names (both without their layer prefix)."""
    out = {hf: tensors[key] for key, hf in _DIRECT.items()}
    q, k, v = split_qkv(tensors[QKV_WEIGHT], m)
    out.update({"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k,
                "self_attn.v_proj.weight": v})
    if m.add_qkv_bias:
        q, k, v = split_qkv(tensors[QKV_BIAS], m)
        out.update({"self_attn.q_proj.bias": q, "self_attn.k_proj.bias": k,
                    "self_attn.v_proj.bias": v})
    gate, up = torch.chunk(tensors[FC1], 2, dim=0)
    out.update({"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up})
    return {name: out[name] for name in hf_layer_names(m)}


def layer_from_hf(tensors: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """One layer, Hugging Face names -> Megatron keys (both without their layer prefix)."""
    out = {key: tensors[hf] for key, hf in _DIRECT.items()}
    out[QKV_WEIGHT] = fuse_qkv(tensors["self_attn.q_proj.weight"],
                               tensors["self_attn.k_proj.weight"],
                               tensors["self_attn.v_proj.weight"], m)
    if m.add_qkv_bias:
        out[QKV_BIAS] = fuse_qkv(tensors["self_attn.q_proj.bias"],
                                 tensors["self_attn.k_proj.bias"],
                                 tensors["self_attn.v_proj.bias"], m)
    out[FC1] = torch.cat([tensors["mlp.gate_proj.weight"], tensors["mlp.up_proj.weight"]], dim=0)
    return out


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def hf_global_names(m: ModelConfig) -> dict[str, str]:
    """Megatron key -> Hugging Face name for the tensors outside the layers."""
    names = {EMBEDDING: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight"}
    if m.untie_embeddings_and_output_weights:
        names[OUTPUT] = "lm_head.weight"
    return names


def hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor of the model `m` describes (vocab_size unpadded), with the
    shape transformers gives it: the names and shapes a model directory must hold."""
    h, ffn, vocab = m.hidden_size, m.ffn_hidden_size, m.vocab_size
    q, kv = m.num_attention_heads * m.head_dim, m.query_groups * m.head_dim
    layer = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h),
             "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
             "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
             "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.weight": (h, q),
             "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (ffn, h),
             "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn)}
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,),
              "lm_head.weight": (vocab, h)}
    shapes = {hf: shapes[hf] for hf in hf_global_names(m).values()}
    for i in range(m.num_layers):
        shapes.update({hf_layer_prefix(i) + n: layer[n] for n in hf_layer_names(m)})
    return shapes
