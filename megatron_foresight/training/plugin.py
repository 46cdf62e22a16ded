"""What a stage plugin provides, and how the framework finds it.

A stage is a package under `plugins/` exposing `PLUGIN`, an object with:

* `Config`: a dataclass for the stage's own recipe section (named after the stage);
* `build_data(ctx) -> StageData`: the train (and validation) datasets, each indexable, each
  sample a dict of equal-length 1-D tensors with at least `tokens`, `labels`, `position_ids` and
  `loss_mask`;
* `loss(batch, per_token_loss) -> (loss_sum, num_tokens, metrics)`: the loss of one microbatch
  as a sum over tokens and the count it should be averaged by (the framework divides once per
  step by the global count), and named metrics as `tensor([sum, count])` pairs that the
  framework sums over microbatches and data-parallel ranks before logging `sum / count`;
* optionally `eval_predictions = True`: during evaluation the batch then also holds
  `predicted`, the model's argmax next token at every position (for token accuracy).

An on-policy stage (FC-RL) sets `on_policy = True`; its `build_data` returns no training
samples. Instead, each step the loop calls `collect(run) -> (samples, metrics)` (episodes played
by the current model, as samples of the same form, with whatever extra per-token tensors its
`loss` reads) and takes optimizer steps over them (`training.loop.on_policy_step`);
`validate(run) -> metrics` replaces the validation-set loss, and `reward_metrics(records) ->
metrics` scores episodes that `foresight eval` played (so it plays them once).

A stage that adds modules to the model (PPO's value head) defines `extend_model(chunks)`, called
after the model is built and before DDP and the optimizer wrap it, so the new parameters are
trained and checkpointed with the rest; `fresh_modules` lists the state-dict prefixes of what it
added, which `checkpoint.init_from` (the previous stage's checkpoint) does not have and therefore
does not load.

The loop, parallelism, checkpoints and logging belong to the framework; plugins depend on it,
never the reverse (plugins are found by name, not imported by the core).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from megatron_foresight.configtree import ConfigError


def fresh_modules(plugin) -> tuple[str, ...]:
    """State-dict prefixes of the modules `plugin` added to the model (see above): what a
    checkpoint of the previous stage does not have."""
    return tuple(getattr(plugin, "fresh_modules", ()))


@dataclass
class StageData:
    train: Sequence[dict]
    valid: Sequence[dict] | None = None


@dataclass
class BuildContext:
    """What a plugin gets to build its data with."""

    cfg: Any  # RecipeConfig
    stage_cfg: Any
    tokenizer: Any
    num_train_samples: int
    num_valid_samples: int
    cache_dir: Path
    progress: bool = True
    """Whether this process may show progress bars (the logging rank)."""


class StagePlugin(Protocol):
    Config: type

    def build_data(self, ctx: BuildContext) -> StageData: ...

    def loss(self, batch: dict, per_token_loss: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...


def available_stages() -> list[str]:
    import plugins
    return sorted(m.name for m in pkgutil.iter_modules(plugins.__path__) if m.ispkg)


def load_plugin(stage: str) -> StagePlugin:
    stages = available_stages()
    if stage not in stages:
        close = difflib.get_close_matches(stage, stages, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError("stage", f"unknown stage {stage!r}{hint}; available: {', '.join(stages)}")
    module = importlib.import_module(f"plugins.{stage}")
    return module.PLUGIN


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, name: str = "lm_loss"):
    """Sum of the per-token loss over the tokens `loss_mask` selects (weights allowed), the
    number of those tokens, and the pair logged as `name`."""
    mask = loss_mask.to(per_token_loss.dtype).view(-1)
    loss_sum = (per_token_loss.float().view(-1) * mask).sum()
    num_tokens = (mask > 0).sum().to(torch.int)
    return loss_sum, num_tokens, {name: torch.stack([loss_sum.detach(), num_tokens.float()])}
