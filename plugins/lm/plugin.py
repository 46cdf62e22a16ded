"""The plain language-model stage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_foresight.configtree import check
from megatron_foresight.data.indexed import (
    build_gpt_datasets, cached_indexed_dataset, file_fingerprint, read_text_documents,
)
from megatron_foresight.data.render import Seg
from megatron_foresight.data.segmented import SegmentedGPTDataset, segment_weight_table
from megatron_foresight.data.synthetic import synthetic_documents
from megatron_foresight.errors import UsageError
from megatron_foresight.training.plugin import BuildContext, StageData, masked_token_loss


@dataclass
class Config:
    """Plain language modelling on a blend of text corpora."""

    sources: list[str] = field(default_factory=lambda: ["builtin"])
    """Corpora: `builtin` (the generated corpus), paths to .jsonl files (a "text" field per
    line) or .txt files (one document per line), or the prefix of a dataset written by
    `foresight data preprocess` (e.g. rendered trajectories: PREFIX.idx and PREFIX_segments)."""
    weights: Optional[list[float]] = None
    """Blend weights, one per source; null means equal."""
    builtin_docs: int = 6000
    """Documents in the generated corpus."""
    split: str = "98,2,0"
    """Train / validation / test split of each corpus, by documents."""
    segment_weights: Optional[dict[str, float]] = None
    """Loss weight of each segment type (text, prompt, action, observation, outcome, think,
    plan, rollout, value); types not named weigh 0. null: every token weighs 1."""

    def __post_init__(self):
        check(len(self.sources) > 0, "sources", "needs at least one corpus")
        check(self.weights is None or len(self.weights) == len(self.sources), "weights",
              f"needs one weight per source ({len(self.sources)}), got {self.weights}")
        check(self.weights is None or all(w > 0 for w in self.weights), "weights",
              "must all be positive")
        check(self.builtin_docs > 0, "builtin_docs", "must be positive")
        parts = self.split.split(",")
        check(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
              "split", f"must be three comma-separated numbers like '98,2,0', got {self.split!r}")
        if self.segment_weights is not None:
            names = [s.name.lower() for s in Seg if s is not Seg.PAD]
            for name, weight in self.segment_weights.items():
                check(name in names, "segment_weights",
                      f"unknown segment type {name!r}; known: {', '.join(names)}")
                check(weight >= 0, "segment_weights", f"{name}: weights must not be negative")
            check(any(w > 0 for w in self.segment_weights.values()), "segment_weights",
                  "at least one segment type needs a positive weight")


def _check_tokenizer(prefix: str, tok) -> None:
    """A preprocessed dataset is token ids of one tokenizer; another would read garbage."""
    meta_path = Path(prefix + ".json")
    if not meta_path.is_file():
        raise UsageError(f"{prefix}.json not found: is {prefix} a dataset written by `foresight "
                         "data preprocess`?")
    written_with = json.loads(meta_path.read_text())["tokenizer"]
    if written_with != tok.describe():
        raise UsageError(f"{prefix} was tokenized with {written_with}, but the recipe's "
                         f"tokenizer is {tok.describe()}; set data.tokenizer to match or "
                         "preprocess again with --tokenizer")


class LanguageModelStage:
    Config = Config
    weight_table = None  # loss weight by segment type; None: every token weighs 1

    def build_data(self, ctx: BuildContext) -> StageData:
        stage: Config = ctx.stage_cfg
        tok = ctx.tokenizer
        prefixes = []
        for source in stage.sources:
            if source == "builtin":
                key = {"builtin": 1, "seed": ctx.cfg.seed, "docs": stage.builtin_docs,
                       "tokenizer": tok.describe()}
                docs = lambda: synthetic_documents(ctx.cfg.seed, stage.builtin_docs)  # noqa: E731
                name = "builtin"
            elif Path(source + ".idx").is_file():
                _check_tokenizer(source, tok)
                prefixes.append(source)
                continue
            else:
                key = {"file": file_fingerprint(source), "tokenizer": tok.describe()}
                docs = lambda source=source: read_text_documents(source)  # noqa: E731
                name = source.replace("/", "_").rsplit(".", 1)[0][-40:]
            prefixes.append(cached_indexed_dataset(key, docs, tok, ctx.cache_dir, name))
        train, valid = build_gpt_datasets(
            prefixes, stage.weights, seq_length=ctx.cfg.data.seq_length, seed=ctx.cfg.seed,
            split=stage.split, num_samples=(ctx.num_train_samples, ctx.num_valid_samples),
            tokenizer=tok, cache_dir=ctx.cache_dir, dataset_cls=SegmentedGPTDataset)
        self.weight_table = (None if stage.segment_weights is None else
                             segment_weight_table(stage.segment_weights))
        return StageData(train=train, valid=valid)

    def loss(self, batch, per_token_loss):
        weights = batch["loss_mask"]
        if self.weight_table is not None:
            if self.weight_table.device != weights.device:
                self.weight_table = self.weight_table.to(weights.device)  # once
            weights = self.weight_table[batch["segments"].long()].to(weights.dtype) * weights
        return masked_token_loss(per_token_loss, weights, "lm_loss")


PLUGIN = LanguageModelStage()
