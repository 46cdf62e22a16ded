"""FE-SFT, format-eliciting SFT: the model learns to write a foresight block before each action.

Data: the world's trajectories re-rendered by hindsight (`hindsight.py`: the rollout target is
the observation that really came next, the value target the Monte-Carlo success estimate of the
state), blended with the same trajectories without foresight (format-free traces) by weight.
Loss: agent turns only (think, plan, rollout, value, action); the prompt and the environment's
observations are context, masked by their segment type."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_foresight.configtree import check
from megatron_foresight.training.sources import WORLD_PREFIX, world_file
from megatron_foresight.data.indexed import file_fingerprint
from megatron_foresight.data.records import record_files
from megatron_foresight.data.trajectory import read_trajectories, write_jsonl
from megatron_foresight.foresight.formats import FORMATS, ForesightFormat
from megatron_foresight.runtime.dist import barrier, is_rank0
from megatron_foresight.training.blend import BlendConfig, BlendStage
from megatron_foresight.training.plugin import BuildContext
from plugins.fe_sft.hindsight import foresight_traces

FORESIGHT_PREFIX = "foresight:"


@dataclass
class Config(BlendConfig):
    """Format-eliciting SFT: agent turns with hindsight foresight blocks, loss on agent turns."""

    sources: list[str] = field(default_factory=lambda: ["foresight:world:train", "world:train"])
    """Datasets to blend: foresight:X is X (world:SPLIT or a trajectory file) turned into
    foresight traces by hindsight (`tools/build_foresight_sft.py` writes the same, given
    --no-plan-ahead where `plan_ahead` is false); X alone is
    format-free traces; also trajectory files already in the foresight format."""
    weights: Optional[list[float]] = field(default_factory=lambda: [0.85, 0.15])
    """Blend weights, one per source (foresight traces vs format-free traces)."""
    valid_sources: Optional[list[str]] = field(
        default_factory=lambda: ["foresight:world:validation"])
    """Held-out traces for the validation loss of each segment type."""
    segment_weights: Optional[dict[str, float]] = field(default_factory=lambda: {
        "think": 1.0, "plan": 1.0, "rollout": 1.0, "value": 1.0, "action": 1.0})
    """Loss weight per segment type: the agent's turns; prompt and observation weigh 0."""
    mask_cut_documents: bool = True
    """No loss on a trajectory whose beginning (the task) lies before the sample's first token:
    a sample of `data.seq_length` tokens is cut from the stream of trajectories and usually
    begins inside one. In the tiny recipe 35% of the agent's tokens were such, learnt without
    the question or problem they answer. Samples shorter than a trajectory keep almost no
    loss with it: raise `data.seq_length` above the trajectories' usual length."""
    pack_documents: bool = True
    """Samples of whole trajectories, padded, instead of windows cut from their stream: no
    trajectory is cut unless it is longer than `data.seq_length`, so mask_cut_documents costs
    (almost) no loss. In the tiny recipe 400 samples hold 171,496 agent tokens with loss,
    against 135,004 cut and masked (14% of the packed samples' tokens are padding)."""
    plan_ahead: bool = True
    """Each hindsight `<plan>` names the action and what followed it in the trajectory ("Search
    for X, then 1 more search, then answer."); false: the action only ("Search for X."). What
    followed includes the errors a trajectory's agent went on to make (the built-in world's
    scripted experts err on purpose: 23% of its one-hop questions' trajectories search twice),
    which the turn's context cannot tell. The tiny recipe sets false: its agent then solved
    0.292 of 400 validation tasks instead of 0.105 (README, the tiny agent; one seed). The
    larger recipes keep the default: unmeasured on their models, which may plan further."""

    def check_recipe(self, cfg) -> None:
        named = [s for s in [*self.sources, *(self.valid_sources or [])]
                 if s.startswith(FORESIGHT_PREFIX)]
        check(cfg.format.foresight or not named, "fe_sft.sources",
              f"foresight_format: none trains without foresight, but {', '.join(named)} "
              f"asks for foresight traces; drop the {FORESIGHT_PREFIX!r} prefix to train on "
              "the same trajectories format-free")


def cached_foresight_traces(source: Path, cache_dir: Path,
                            fmt: ForesightFormat = FORMATS["v1"], plan_ahead: bool = True) -> Path:
    """`source` trajectories (a file, or a directory of parts such as `foresight data
    collect`'s output) as foresight traces in the format version `fmt` (plans as
    `plan_ahead` says), in the cache, written once per content: a new or grown part is new
    content."""
    files = [file_fingerprint(f) for f in record_files(source)]
    key = json.dumps({"hindsight": 2, "files": files,
                      **({"format": fmt.name} if fmt.name != "v1" else {}),
                      **({} if plan_ahead else {"plan_ahead": False})}, sort_keys=True)
    out = cache_dir / f"foresight-{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    if is_rank0() and not out.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(foresight_traces(read_trajectories(source), Counter(), fmt, plan_ahead),
                    out)
    barrier()
    return out


class FormatElicitingStage(BlendStage):
    Config = Config

    def resolve(self, source: str, ctx: BuildContext) -> str:
        if not source.startswith(FORESIGHT_PREFIX):
            return source
        inner = source[len(FORESIGHT_PREFIX):]
        path = (world_file(ctx.cfg.data.world, inner[len(WORLD_PREFIX):], ctx.cfg.seed)
                if inner.startswith(WORLD_PREFIX) else Path(inner))
        return str(cached_foresight_traces(path, Path(ctx.cache_dir), ctx.cfg.format,
                                           self.stage.plan_ahead))


STAGE = FormatElicitingStage
