"""What the supervised stages share (lm, WM-AMT, FE-SFT): next-token loss on a weighted blend
of datasets, each token's loss weighted by its segment type (prompt, action, observation, ...),
with the loss of every weighted type logged on its own.

A stage subclasses `BlendConfig` for its recipe section (its own defaults: which sources, which
renderer, which segments carry loss) and `BlendStage` for the plugin, overriding `resolve` when
it names sources of its own (FE-SFT's hindsight traces)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_foresight.configtree import check
from megatron_foresight.data.indexed import build_gpt_datasets
from megatron_foresight.data.render import RENDERERS, TEXT_RENDERER, Seg
from megatron_foresight.data.segmented import dataset_class, segment_weight_table
from megatron_foresight.config import StageConfig
from megatron_foresight.training.plugin import (
    BuildContext, StageData, SupervisedStage, masked_token_loss,
)
from megatron_foresight.training.sources import SourceContext, source_prefix

SEGMENT_NAMES = [s.name.lower() for s in Seg if s is not Seg.PAD]


@dataclass
class BlendConfig(StageConfig):
    """Next-token loss on a blend of datasets, weighted per segment type."""

    sources: list[str] = field(default_factory=lambda: ["builtin"])
    """Datasets to blend: builtin (the generated corpus), world:SPLIT (the built-in world's
    trajectories), paths to trajectory files or shards, text files (.jsonl with a "text" field,
    .txt one document per line), or the prefix of a dataset written by `foresight data
    preprocess`."""
    weights: Optional[list[float]] = None
    """Blend weights, one per source; null means equal."""
    valid_sources: Optional[list[str]] = None
    """Held-out datasets for validation (same forms as sources). null: validate on the `split`
    share of the sources' documents."""
    split: str = "98,2,0"
    """Train / validation / test split of each source, by documents (when valid_sources is
    null)."""
    builtin_docs: int = 6000
    """Documents in the generated corpus (source `builtin`)."""
    renderer: str = "transcript"
    """How trajectories become segments of text (`foresight data preprocess --renderer`)."""
    segment_weights: Optional[dict[str, float]] = None
    """Loss weight of each segment type (text, prompt, action, observation, outcome, think,
    plan, rollout, value); types not named weigh 0. null: every token weighs 1."""
    mask_cut_documents: bool = False
    """No loss on the tokens of a document whose beginning lies before the sample's first
    token. Samples are cut from the stream of documents without regard to their bounds: text
    loses little by it, agent turns whose task was cut off are learnt without the question they
    answer (FE-SFT sets it; 35% of its agent tokens in the tiny recipe)."""
    pack_documents: bool = False
    """Samples of whole documents: as many as fit in data.seq_length tokens, the rest padded
    (no loss on padding), instead of cutting the stream of documents at every seq_length
    tokens. No document is cut unless it is longer than a sample (then mask_cut_documents
    applies to its later parts), so cut-off turns cost no loss; padding costs compute (the
    share is logged when the data is built)."""

    def __post_init__(self):
        check(len(self.sources) > 0, "sources", "needs at least one dataset")
        check(self.weights is None or len(self.weights) == len(self.sources), "weights",
              f"needs one weight per source ({len(self.sources)}), got {self.weights}")
        check(self.weights is None or all(w > 0 for w in self.weights), "weights",
              "must all be positive")
        check(self.valid_sources is None or len(self.valid_sources) > 0, "valid_sources",
              "null or at least one dataset")
        check(self.builtin_docs > 0, "builtin_docs", "must be positive")
        parts = self.split.split(",")
        check(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
              "split", f"must be three comma-separated numbers like '98,2,0', got {self.split!r}")
        check(self.renderer in RENDERERS or self.renderer == TEXT_RENDERER
              or (Path(__file__).parents[2] / "plugins" / self.renderer).is_dir(), "renderer",
              f"unknown renderer {self.renderer!r}; known: "
              f"{', '.join(sorted([*RENDERERS, TEXT_RENDERER]))} or a stage's name")
        if self.segment_weights is not None:
            for name, weight in self.segment_weights.items():
                check(name in SEGMENT_NAMES, "segment_weights",
                      f"unknown segment type {name!r}; known: {', '.join(SEGMENT_NAMES)}")
                check(weight >= 0, "segment_weights", f"{name}: weights must not be negative")
            check(any(w > 0 for w in self.segment_weights.values()), "segment_weights",
                  "at least one segment type needs a positive weight")


class BlendStage(SupervisedStage):
    """A stage plugin over a `BlendConfig` section (see the plugin contract in plugin.py).
    `eval_predictions` (the per-segment token accuracy) costs the full gathered logits of a
    microbatch."""

    Config = BlendConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.weight_table: torch.Tensor | None = None  # loss weight by segment type
        self.logged: list = []

    def resolve(self, source: str, ctx: BuildContext) -> str:
        """A stage's own source names become files here; the rest are the core's."""
        return source

    def build_data(self, ctx: BuildContext) -> StageData:
        stage = ctx.stage_cfg
        sc = SourceContext(seed=ctx.cfg.seed, tokenizer=ctx.tokenizer,
                           tokenizer_cfg=ctx.cfg.data.tokenizer_config(),
                           cache_dir=Path(ctx.cache_dir), world=ctx.cfg.data.world,
                           builtin_docs=stage.builtin_docs)
        prefix = lambda s: source_prefix(self.resolve(s, ctx), stage.renderer, sc)  # noqa: E731
        train, valid = build_gpt_datasets(
            [prefix(s) for s in stage.sources], stage.weights, seq_length=ctx.cfg.data.seq_length,
            seed=ctx.cfg.seed, split=stage.split,
            num_samples=(ctx.num_train_samples, ctx.num_valid_samples), tokenizer=ctx.tokenizer,
            cache_dir=ctx.cache_dir,
            dataset_cls=dataset_class(stage.pack_documents, stage.mask_cut_documents),
            valid_prefixes=[prefix(s) for s in stage.valid_sources or []],
            documents=ctx.documents)
        self.logged = [] if stage.segment_weights is None else sorted(
            (Seg[n.upper()] for n, w in stage.segment_weights.items() if w > 0), key=int)
        self.weight_table = (None if stage.segment_weights is None else
                             segment_weight_table(stage.segment_weights))
        return StageData(train=train, valid=valid)

    def loss(self, batch, per_token_loss):
        weights = batch["loss_mask"]
        if self.weight_table is not None:
            if self.weight_table.device != weights.device:
                self.weight_table = self.weight_table.to(weights.device)  # once
            weights = self.weight_table[batch["segments"].long()].to(weights.dtype) * weights
        loss_sum, num_tokens, metrics = masked_token_loss(per_token_loss, weights, "lm_loss")
        metrics.update(segment_metrics(batch, per_token_loss, self.logged))
        return loss_sum, num_tokens, metrics


def segment_metrics(batch: dict, per_token_loss: torch.Tensor, kinds: list[Seg]) -> dict:
    """`loss/KIND` (mean loss of that segment type's tokens), and `acc/KIND` (share of them
    the model's argmax predicts) when the batch carries predictions, as (sum, count) pairs."""
    out = {}
    segments = batch["segments"]
    predicted = batch.get("predicted")
    for kind in kinds:
        where = (segments == int(kind)) & (batch["loss_mask"] > 0)
        count = where.sum().float()
        name = kind.name.lower()
        out[f"loss/{name}"] = torch.stack([per_token_loss.detach().float()[where].sum(), count])
        if predicted is not None:
            hits = (predicted == batch["labels"])[where].sum().float()
            out[f"acc/{name}"] = torch.stack([hits, count])
    return out
