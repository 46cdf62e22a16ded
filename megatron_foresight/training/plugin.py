"""What a stage plugin provides, and how the framework finds it.

A stage is a package under `plugins/` exposing `STAGE`, a subclass of `SupervisedStage` or
`OnPolicyStage` below. The classes list every hook the core calls; each has a default where a
stage may leave it out, so the core calls them all and probes for none. One instance is made per
run (`STAGE(cfg)`), so per-run state lives on it and never on a module.

Every stage:

* `Config`: the dataclass of its own recipe section (named after the stage), a
  `config.StageConfig` whose `check_recipe(cfg)` holds the checks that involve the rest of the recipe; they run
  whenever a recipe loads (`foresight config`, `plan`, `train`, `eval`, `pipeline`);
* `loss(batch, per_token_loss) -> (loss_sum, num_tokens, metrics)`: the loss of one microbatch
  as a sum over tokens and the count it should be averaged by (the framework divides once per
  step by the global count), and named metrics as `tensor([sum, count])` pairs that the
  framework sums over microbatches and data-parallel ranks before logging `sum / count`;
* `extend_model(chunks, ctx) -> prefixes`: modules the stage adds to the model (PPO's value
  head) before DDP and the optimizer wrap it, so they are trained and checkpointed with the
  rest; it returns their state-dict prefixes, which `checkpoint.init_from` (the previous stage's
  checkpoint) does not have and therefore does not load;
* `eval_predictions`: when true, evaluation batches also hold `predicted`, the model's argmax
  next token at every position (for token accuracy);
* class-level, for tools that start no process: `pipeline_overrides()` (what `foresight
  pipeline` sets in the stage's recipe), `plan_memory(...)` and `plan_step(...)` (what the
  stage adds to `foresight plan`'s per-GPU memory and step FLOPs).

A supervised stage reads datasets: `build_data(ctx) -> StageData`, each sample a dict of
equal-length 1-D tensors with at least `tokens`, `labels`, `position_ids` and `loss_mask`.

An on-policy stage (FC-RL) makes its samples while it trains: `setup(ctx)` prepares what it
plays (task sets, environments); each step the loop calls `collect(rt) -> (samples, metrics)`
(episodes played by the current model, as samples of the same form with whatever extra per-token
tensors its `loss` reads) and takes `epochs` passes of optimizer steps over them
(`training.loop.on_policy_step`); `validate(rt) -> metrics` replaces the validation-set loss, and
`reward_metrics(records, prefix) -> metrics` scores episodes that `foresight eval` played (so
it plays them once). Hooks that run with a model get a `StageRuntime`: the model chunks, the
parallel context (ranks and groups) and the step, not the loop's whole state.

The loop, parallelism, checkpoints and logging belong to the framework; plugins depend on it,
never the reverse (plugins are found by name, not imported by the core).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from megatron_foresight.configtree import ConfigError


@dataclass
class StageData:
    train: Sequence[dict]
    valid: Sequence[dict] | None = None


@dataclass
class BuildContext:
    """What a stage gets to build its data (or what it plays) with."""

    cfg: Any  # RecipeConfig
    stage_cfg: Any
    tokenizer: Any
    num_train_samples: int
    num_valid_samples: int
    cache_dir: Path
    progress: bool = True
    """Whether this process may show progress bars (the logging rank)."""
    documents: str | None = None
    """How packed samples keep attention inside each document (data.document_masks): None,
    "mask" or "starts" (`models.provider.document_format`, decided once per run)."""


@dataclass
class StageRuntime:
    """What a stage's hooks get while the model runs."""

    chunks: list
    """The model chunks (GPTModel, or Float16Module around it), unwrapped from DDP."""
    ctx: Any  # runtime.dist.ParallelContext: ranks, sizes, process groups
    step: int
    """Optimizer steps done (rollout steps for an on-policy stage)."""


@dataclass
class StagePlan:
    """What a stage adds to one pipeline stage's per-GPU memory in `foresight plan`, in bytes."""

    reference_model: int = 0
    kv_cache: int = 0


class Stage(ABC):
    Config: ClassVar[type]
    on_policy: ClassVar[bool] = False
    eval_predictions: ClassVar[bool] = False

    def __init__(self, cfg):
        self.cfg, self.stage = cfg, cfg.stage_config

    @abstractmethod
    def loss(self, batch: dict, per_token_loss: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...

    def extend_model(self, chunks: list, ctx) -> tuple[str, ...]:
        return ()

    @classmethod
    def pipeline_overrides(cls) -> list[str]:
        return []

    @classmethod
    def plan_memory(cls, cfg, weight_bytes: int, layers: int, half: bool) -> StagePlan:
        """Extra memory of one pipeline stage holding `layers` layers whose weights take
        `weight_bytes` per GPU."""
        return StagePlan()

    @classmethod
    def plan_step(cls, cfg, dp: int) -> tuple[int, int, int]:
        """(tokens, training passes, extra forward passes) of one step over all ranks."""
        return cfg.schedule.global_batch_size * cfg.data.seq_length, 1, 0


class SupervisedStage(Stage):
    @abstractmethod
    def build_data(self, ctx: BuildContext) -> StageData: ...


class OnPolicyStage(Stage):
    on_policy = True

    @property
    def epochs(self) -> int:
        """Passes of optimizer steps over each step's samples."""
        return 1

    @abstractmethod
    def setup(self, ctx: BuildContext) -> None: ...

    @abstractmethod
    def collect(self, rt: StageRuntime) -> tuple[list[dict], dict[str, float]]: ...

    @abstractmethod
    def validate(self, rt: StageRuntime) -> dict[str, float]: ...

    @abstractmethod
    def reward_metrics(self, records, prefix: str = "val") -> dict[str, float]: ...


def available_stages() -> list[str]:
    import plugins
    return sorted(m.name for m in pkgutil.iter_modules(plugins.__path__) if m.ispkg)


def load_plugin(stage: str) -> type[Stage]:
    """The stage class of `plugins/<stage>` (`STAGE`)."""
    stages = available_stages()
    if stage not in stages:
        close = difflib.get_close_matches(stage, stages, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError("stage", f"unknown stage {stage!r}{hint}; available: {', '.join(stages)}")
    module = importlib.import_module(f"plugins.{stage}")
    return module.STAGE


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, name: str = "lm_loss"):
    """Sum of the per-token loss over the tokens `loss_mask` selects (weights allowed), the
    number of those tokens, and the pair logged as `name`."""
    mask = loss_mask.to(per_token_loss.dtype).view(-1)
    loss_sum = (per_token_loss.float().view(-1) * mask).sum()
    num_tokens = (mask > 0).sum().to(torch.int)
    return loss_sum, num_tokens, {name: torch.stack([loss_sum.detach(), num_tokens.float()])}
