"""PPO's critic as a value head on the policy: a linear map from the final hidden states (after
the decoder's final norm) to one scalar per position, sharing the policy's trunk.

The head is attached as a submodule of the last pipeline stage's GPTModel (`value_head`), so
Megatron's DDP reduces its gradients, the optimizer steps it and distributed checkpoints save it
with the model. A forward hook on the final norm computes the values during the model's normal
forward pass (the one that yields the per-token cross-entropy), so a training step costs no
extra forward; `ValueHead.last` holds them, [batch, sequence], until the next forward.

Position j's value estimates the return from the state before token j + 1 is sampled, which is
the position that scores token j + 1 (`rl.rollout.to_sample` aligns rewards the same way).
Without sequence parallelism the final hidden states are whole on every tensor-parallel rank,
so the head is replicated like a norm: every rank computes the same values and gradients."""

from __future__ import annotations

import torch

PREFIX = "value_head."


class ValueHead(torch.nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        # Starts at V = 0 everywhere: the first updates move the head, not the trunk.
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.last: torch.Tensor | None = None

    def capture(self, _module, _inputs, hidden_SBH: torch.Tensor) -> None:
        hidden = hidden_SBH.to(self.linear.weight.dtype)
        self.last = self.linear(hidden).squeeze(-1).transpose(0, 1).float()


def attach_value_head(model) -> ValueHead:
    """Add a value head to `model` (a GPTModel, or one wrapped by Float16Module); returns it."""
    inner = getattr(model, "module", model)
    norm = getattr(getattr(inner, "decoder", None), "final_layernorm", None)
    if norm is None:
        raise ValueError("the value head needs the model's final norm: attach it to the last "
                         "pipeline stage of a model with post_process")
    if getattr(inner.config, "sequence_parallel", False):
        raise ValueError("the value head reads whole final hidden states; sequence "
                         "parallelism splits them")
    weight = next(norm.parameters())
    head = ValueHead(inner.config.hidden_size).to(device=weight.device)
    inner.value_head = head
    norm.register_forward_hook(head.capture)
    return head
