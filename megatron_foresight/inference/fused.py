"""The continuous engine's decode step as one function over the model's own weights.

A decode step appends one token to each running slot. On a small model (the tiny default:
hidden 256, 4 layers, a few to a few dozen rows) its arithmetic takes a fraction of a
millisecond, and Megatron's module stack (a dozen `Module.__call__`s per layer, tensor-parallel
wrappers, bias-dropout-add closures, the inference context's bookkeeping) costs several times
that in Python: a cProfile of single-turn decode on the slot cache found matmuls ~half of the
time and Megatron's per-module Python the rest. `FusedDecode.logits` runs the same computation
as `GPTModel.forward` with `SlotSelfAttention` for one new token per row, as plain tensor ops
on the model's parameters (read, never copied: a training step's update is seen by the next
rollout): embedding, and per layer RMSNorm or LayerNorm, the fused QKV projection split by
query group as Megatron splits it, RoPE from the same cos/sin tables (`models.rope`), the new
key and value written into the slot cache, attention of the one query over the slot, the
output projection and residual, the MLP (SwiGLU or a plain activation) and residual; then the
final norm and the output layer. Prefill stays Megatron's forward, which allocates the caches
this reads and writes.

It covers one configuration, that of the CPU path's layers (and any local-spec model like it):
tensor and pipeline parallelism 1, the local layer spec (torch norms, Megatron's parallel
linears), RoPE or no position embedding, no QK norm, dense MLPs; `unsupported` names what a
model has outside that, and the engine then decodes through Megatron's forward as before.

Exactness: the same ops in the same dtypes as the module path, so greedy tokens are the same and
log-probabilities equal to float rounding (tests/test_continuous.py compares both with the
module path on the tiny model, fp32 and bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_foresight.inference.slots import _attend, _rotate
from megatron_foresight.models import rope


def _unwrap(model):
    """The `GPTModel` inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _norm(module) -> tuple:
    if isinstance(module, torch.nn.RMSNorm):
        return ("rms", module.normalized_shape, module.weight, module.eps)
    return ("ln", module.normalized_shape, module.weight, module.bias, module.eps)


def _apply_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    if norm[0] == "rms":
        return F.rms_norm(x, norm[1], norm[2], norm[3])
    return F.layer_norm(x, norm[1], norm[2], norm[3], norm[4])


def _identity(module) -> bool:
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

    return module is None or isinstance(module, (IdentityOp, IdentityFuncOp))


def _layer_unsupported(layer, c) -> list[str]:
    """What of one transformer layer the fused step does not compute as Megatron does."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_foresight.inference.slots import SlotSelfAttention

    out = []
    if type(layer).forward is not TransformerLayer.forward:
        out.append(f"layer class {type(layer).__name__}")
    norms = (layer.input_layernorm, layer.pre_mlp_layernorm)
    if not all(isinstance(n, (torch.nn.RMSNorm, torch.nn.LayerNorm)) for n in norms):
        out.append(f"norm {type(layer.input_layernorm).__name__} (torch norms only)")
    if not all(_identity(getattr(layer, name, None)) for name in
               ("cross_attention", "pre_cross_attn_layernorm")):
        out.append("cross-attention")
    attention = layer.self_attention
    if not isinstance(attention, SlotSelfAttention):
        out.append(f"attention {type(attention).__name__}")
    elif not (_identity(attention.q_layernorm) and _identity(attention.k_layernorm)):
        out.append("QK norm")
    elif not (isinstance(attention.linear_qkv, ColumnParallelLinear)
              and isinstance(attention.linear_proj, RowParallelLinear)):
        out.append(f"attention linears {type(attention.linear_qkv).__name__}")
    mlp = layer.mlp
    if not isinstance(mlp, MLP):
        out.append(f"MLP {type(mlp).__name__}")
    elif not (isinstance(mlp.linear_fc1, ColumnParallelLinear)
              and isinstance(mlp.linear_fc2, RowParallelLinear)):
        out.append(f"MLP linears {type(mlp.linear_fc1).__name__}")
    elif c.gated_linear_unit and mlp.activation_func is not F.silu:
        out.append("gated MLP with an activation other than SiLU")
    elif not c.gated_linear_unit and c.bias_activation_fusion:
        out.append("fused bias + activation without a gated unit (Megatron's tanh GELU)")
    elif c.glu_linear_offset or c.activation_func_clamp_value is not None:
        out.append("GLU linear offset or activation clamp")
    return out


def unsupported(model) -> list[str]:
    """What of `model` the fused step does not implement (empty: it can decode the model).
    Every layer is checked, and each is computed from its own modules."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from megatron_foresight.inference.slots import unsupported_by_slots

    gpt = _unwrap(model)
    if not isinstance(gpt, GPTModel):
        return [f"{type(gpt).__name__} is not a Megatron GPTModel"]
    c = gpt.config
    out = [name for name, bad in (
        ("tensor parallelism > 1", ps.get_tensor_model_parallel_world_size() > 1),
        ("pipeline parallelism > 1", ps.get_pipeline_model_parallel_world_size() > 1),
        ("sequence parallelism", c.sequence_parallel),
        ("QK layernorm", c.qk_layernorm or c.qk_l2_norm),
        ("mixture of experts", bool(c.num_moe_experts)),
        ("multi-latent attention", c.multi_latent_attention),
        ("heterogeneous layers", c.heterogeneous_block_specs),
        ("experimental attention", c.experimental_attention_variant is not None),
        ("fp32 residual connection", c.fp32_residual_connection),
        ("residual after the layernorm", c.apply_residual_connection_post_layernorm),
        ("multi-token prediction", getattr(gpt, "mtp_process", False)),
        ("position embedding other than RoPE", gpt.position_embedding_type not in
         ("rope", "none")),
    ) if bad]
    out += unsupported_by_slots(c)
    for layer in getattr(gpt.decoder, "layers", []):
        out += _layer_unsupported(layer, c)
    final = getattr(gpt.decoder, "final_layernorm", None)
    if final is None or not isinstance(final, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
        out.append("no final torch norm")
    return sorted(set(out))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Megatron's local linear: the product, then the bias as its own add (in bf16 an add
    inside the product would round once instead of twice)."""
    y = F.linear(x, weight)
    return y if bias is None else y + bias


class _Layer:
    """One transformer layer's parameters (references to the module's tensors)."""

    def __init__(self, layer):
        attention = layer.self_attention
        self.number = attention.layer_number
        self.norm1, self.norm2 = _norm(layer.input_layernorm), _norm(layer.pre_mlp_layernorm)
        qkv, proj = attention.linear_qkv, attention.linear_proj
        self.w_qkv, self.b_qkv = qkv.weight, qkv.bias
        self.w_proj, self.b_proj = proj.weight, proj.bias
        fc1, fc2 = layer.mlp.linear_fc1, layer.mlp.linear_fc2
        self.w_fc1, self.b_fc1 = fc1.weight, fc1.bias
        self.w_fc2, self.b_fc2 = fc2.weight, fc2.bias
        self.groups = attention.num_query_groups_per_partition
        self.heads = attention.num_attention_heads_per_partition
        self.dim = attention.hidden_size_per_attention_head
        self.scale = attention.config.softmax_scale or self.dim ** -0.5
        self.gated = attention.config.gated_linear_unit
        self.activation = layer.mlp.activation_func


class FusedDecode:
    """The decode step of a `SlotEngine` over `model`'s weights (see the module docstring).
    Build it only where `unsupported(model)` is empty."""

    def __init__(self, model, vocab_size: int):
        gpt = _unwrap(model)
        self.gpt = gpt
        self.embedding = gpt.embedding.word_embeddings.weight
        self.layers = [_Layer(layer) for layer in gpt.decoder.layers]
        self.final_norm = _norm(gpt.decoder.final_layernorm)
        self.vocab_size = vocab_size
        self.rope = gpt.position_embedding_type == "rope"

    def _output_weight(self) -> torch.Tensor:
        gpt = self.gpt
        if gpt.share_embeddings_and_output_weights:
            return gpt.shared_embedding_or_output_weight()
        return gpt.output_layer.weight

    def _angles(self, context, pos_B: torch.Tensor, dtype):
        """cos, sin at each row's position, [B, 1, 1, rot], from the table the layers
        received in the prefill (a decode step always follows one)."""
        cos_MR, sin_MR = (x[:, 0, 0] for x in rope.cos_sin(context.rotary_pos_emb, dtype))
        return cos_MR[pos_B][:, None, None], sin_MR[pos_B][:, None, None]

    def logits(self, context, tokens_B: torch.Tensor) -> torch.Tensor:
        """One new token per row of the step `context.begin` described (one query each):
        the next-token logits [B, V] (float32; ids past the tokenizer's vocabulary -inf). The
        new keys and values go into the rows' slots; the caller advances the lengths."""
        step = context.step
        pos_B = step.pos_BN[:, 0]
        h_BH = self.embedding[tokens_B]
        cos = sin = None
        if self.rope:
            cos, sin = self._angles(context, pos_B, h_BH.dtype)
        for L in self.layers:
            h_BH = self._layer(L, h_BH, context, step, cos, sin)
        h_BH = _apply_norm(h_BH, self.final_norm)
        logits_BV = F.linear(h_BH, self._output_weight()).float()
        logits_BV[:, self.vocab_size:] = float("-inf")
        return logits_BV

    @staticmethod
    def _layer(L: _Layer, h_BH, context, step, cos, sin) -> torch.Tensor:
        B = h_BH.size(0)
        G, R, D = L.groups, L.heads // L.groups, L.dim
        qkv = _linear(_apply_norm(h_BH, L.norm1), L.w_qkv, L.b_qkv).view(B, G, R + 2, D)
        qk_BGKD, v_BGD = qkv[:, :, :R + 1], qkv[:, :, R + 1]  # a group's queries and key
        if cos is not None:  # one rotation of queries and keys together (elementwise: same bits)
            qk_BGKD = _rotate(qk_BGKD, cos, sin)
        q_BGRD, k_BGD = qk_BGKD[:, :, :R], qk_BGKD[:, :, R]
        k_cache, v_cache = context.kv[L.number]
        step.write(k_cache, v_cache, k_BGD, v_BGD)
        out = _attend(q_BGRD.reshape(1, B, G * R, D), step.key_rows(k_cache),
                      step.value_rows(v_cache), step.keep_BNT, L.scale)[0]
        h_BH = h_BH + _linear(out, L.w_proj, L.b_proj)
        x_BF = _linear(_apply_norm(h_BH, L.norm2), L.w_fc1, L.b_fc1)
        if L.gated:
            gate, up = x_BF.chunk(2, dim=-1)
            x_BF = F.silu(gate) * up
        else:
            x_BF = L.activation(x_BF)
        return h_BH + _linear(x_BF, L.w_fc2, L.b_fc2)
