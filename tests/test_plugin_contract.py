"""Every stage plugin honours the contract in megatron_foresight/training/plugin.py."""

import dataclasses

import pytest
import torch

from megatron_foresight.config import load_recipe
from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.training.data import collate
from megatron_foresight.training.plugin import BuildContext, available_stages, load_plugin
from helpers.run import REPO


@pytest.mark.parametrize("stage", available_stages())
def test_plugin_contract(stage, megatron_cpu, tmp_path):
    plugin = load_plugin(stage)
    assert dataclasses.is_dataclass(plugin.Config)
    plugin.Config()  # defaults are valid
    recipe = next(p for p in sorted((REPO / "recipes" / "tiny-cpu").glob("*.yaml"))
                  if load_recipe(p).stage == stage)
    cfg = load_recipe(recipe, ["data.seq_length=64", f"{stage}.builtin_docs=300"]
                      if stage == "lm" else ["data.seq_length=64"])
    data = plugin.build_data(BuildContext(cfg=cfg, stage_cfg=cfg.stage_config,
                                          tokenizer=ByteTokenizer(), num_train_samples=32,
                                          num_valid_samples=8, cache_dir=tmp_path))
    assert len(data.train) >= 32
    samples = [data.train[i] for i in range(4)]
    for sample in samples:
        for key in ("tokens", "labels", "position_ids", "loss_mask"):
            assert sample[key].shape == (64,), key
    batch = collate(samples)  # the loop's own batching
    per_token = torch.rand(4, 64)
    loss_sum, num_tokens, metrics = plugin.loss(batch, per_token)
    assert loss_sum.shape == () and num_tokens.dtype == torch.int
    assert 0 < num_tokens <= 4 * 64
    for name, pair in metrics.items():
        assert pair.shape == (2,), name
    # The loss is a weighted sum of the per-token losses: linear, and blind to masked tokens.
    mask = batch["loss_mask"].float()
    other = torch.rand(4, 64)
    both, _, _ = plugin.loss(batch, per_token + other)
    assert torch.isclose(both, loss_sum + plugin.loss(batch, other)[0])
    assert plugin.loss(batch, per_token * (mask == 0))[0] == 0
    if getattr(plugin, "weight_table", None) is None:  # no per-segment weights: the masked sum
        assert torch.isclose(loss_sum, (per_token * mask).sum())
    else:  # per-segment weights: each token weighs its segment's weight
        weights = plugin.weight_table[batch["segments"].long()] * mask
        assert torch.isclose(loss_sum, (per_token * weights).sum())
