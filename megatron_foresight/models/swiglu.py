"""SwiGLU for Megatron-Core's local layers, with its input's gradient written in one buffer.

Megatron's unfused MLP (`bias_activation_fusion` off, the local path) computes
`silu(gate) * (up + glu_linear_offset)` on the two halves of linear_fc1's output, views from
`torch.chunk`. Autograd then adds the (zero) offset as an op, and its backward builds the two
halves' gradients separately and concatenates them: a copy of the whole [tokens, 2 x ffn]
gradient per layer and microbatch (the `aten::cat` that made the Megatron path's backward
slower than Hugging Face's loop in benchmarks/train_throughput.py). Megatron's fused
replacement (`fusions.fused_bias_swiglu`) is `torch.compile`d, which on a CPU means compiling
in every process that trains.

Here `SwiGLU` saves the input and silu(gate), and its backward writes each half's gradient
straight into its half of one buffer: the up branch's as grad * silu(gate), the gate's with
silu's own backward kernel of grad * up. Those are the values autograd computes for the
unfused expression, in the same order of operations (tested bit for bit in fp32 and bf16).

`install` routes Megatron's `bias_swiglu_impl` here (the MLP calls it when
`bias_activation_fusion` is set, as `transformer_config` does for SwiGLU on the local path);
what this does not cover (a bias, FP8 input store, activation offloading) goes to Megatron's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_megatron_impl = None


class SwiGLU(torch.autograd.Function):
    """silu(x[..., :f]) * x[..., f:]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(x, activated)
        return activated * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, activated = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = torch.chunk(grad_x, 2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_x


def bias_swiglu_impl(x, bias, fp8_input_store=False, cpu_offload_input=False):
    """`megatron.core.fusions.fused_bias_swiglu.bias_swiglu_impl`, through `SwiGLU` where it
    applies."""
    if bias is not None or fp8_input_store or cpu_offload_input:
        return _megatron_impl(x, bias, fp8_input_store, cpu_offload_input)
    return SwiGLU.apply(x)


def install() -> None:
    """Route the MLP's fused SwiGLU call to `bias_swiglu_impl` above. Idempotent; for the local
    layers only (with Transformer Engine, Megatron's fused kernel stays). The route is
    process-wide: a Transformer Engine model built after a local one in the same process would
    also take it (same values, without Megatron's fused kernel). MoE experts call
    `weighted_bias_swiglu_impl`, not routed (no recipe builds experts)."""
    global _megatron_impl
    from megatron.core.transformer import mlp

    if mlp.bias_swiglu_impl is bias_swiglu_impl:
        return
    _megatron_impl = mlp.bias_swiglu_impl
    mlp.bias_swiglu_impl = bias_swiglu_impl
