"""Every stage plugin honours the contract in megatron_foresight/training/plugin.py: it is a
`SupervisedStage` or an `OnPolicyStage`, its config a `StageConfig`, one instance per run."""

import dataclasses

import pytest
import torch

from megatron_foresight.config import StageConfig, load_recipe
from megatron_foresight.data.tokenizer import ByteTokenizer
from megatron_foresight.training.data import collate
from megatron_foresight.training.plugin import (
    BuildContext, OnPolicyStage, SupervisedStage, available_stages, load_plugin,
)
from helpers.run import REPO

SUPERVISED = [s for s in available_stages() if not load_plugin(s).on_policy]
ON_POLICY = [s for s in available_stages() if load_plugin(s).on_policy]


def _build(stage, world, tmp_path):
    stage_cls = load_plugin(stage)
    assert dataclasses.is_dataclass(stage_cls.Config)
    assert issubclass(stage_cls.Config, StageConfig)
    stage_cls.Config()  # defaults are valid
    recipe = next(p for p in sorted((REPO / "recipes" / "tiny-cpu").glob("*.yaml"))
                  if load_recipe(p).stage == stage)
    overrides = ["data.seq_length=64", f"data.world={world}"]
    if stage == "fe_sft":  # a 64-byte sample never holds a trajectory's first agent turn
        overrides.append("fe_sft.mask_cut_documents=false")
    cfg = load_recipe(recipe, overrides + [f"{stage}.builtin_docs=300"] if stage == "lm"
                      else overrides)
    plugin = stage_cls(cfg)
    assert plugin.stage is cfg.stage_config and stage_cls(cfg) is not plugin
    ctx = BuildContext(cfg=cfg, stage_cfg=cfg.stage_config, tokenizer=ByteTokenizer(),
                       num_train_samples=32, num_valid_samples=8, cache_dir=tmp_path)
    if plugin.on_policy:
        plugin.setup(ctx)
        return plugin, None
    return plugin, plugin.build_data(ctx)


def test_every_stage_is_one_of_the_two_kinds():
    assert SUPERVISED and ON_POLICY
    for stage in available_stages():
        stage_cls = load_plugin(stage)
        assert issubclass(stage_cls, OnPolicyStage if stage_cls.on_policy else SupervisedStage)


@pytest.mark.parametrize("stage", SUPERVISED)
def test_plugin_contract(stage, megatron_cpu, small_world, tmp_path):
    plugin, data = _build(stage, small_world, tmp_path)
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
    if plugin.weight_table is None:  # no per-segment weights: the masked sum
        assert torch.isclose(loss_sum, (per_token * mask).sum())
    else:  # per-segment weights: each token weighs its segment's weight
        weights = plugin.weight_table[batch["segments"].long()] * mask
        assert torch.isclose(loss_sum, (per_token * weights).sum())


@pytest.mark.parametrize("stage", ON_POLICY)
def test_on_policy_plugin_contract(stage, megatron_cpu, small_world, tmp_path):
    """An on-policy stage makes its samples while training (`collect`) and validates by
    playing (`validate`); its loss is zero with zero advantages at the sampling policy and
    ignores tokens off the mask."""
    plugin, _ = _build(stage, small_world, tmp_path)
    assert plugin.epochs >= 1 and plugin.pipeline_overrides()
    per_token = torch.rand(2, 8)
    mask = torch.tensor([[0., 1., 1., 1., 0., 0., 1., 1.]] * 2)
    batch = {"loss_mask": mask, "advantages": torch.zeros(2, 8), "old_logprobs": -per_token,
             "rollout_logprobs": -per_token, "ref_logprobs": -per_token}
    loss_sum, count, _ = plugin.loss(batch, per_token)
    assert loss_sum == 0 and count > 0
    batch["advantages"] = torch.randn(2, 8)
    moved = per_token + 5 * (mask == 0)  # change only what the mask hides
    assert torch.isclose(plugin.loss(batch, moved)[0], plugin.loss(batch, per_token)[0])
