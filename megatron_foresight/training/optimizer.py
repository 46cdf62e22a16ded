"""Megatron-Core's optimizer (fp32 master weights, optional distributed optimizer) and its
learning-rate / weight-decay schedule, from the recipe."""

from __future__ import annotations

from megatron_foresight.config import RecipeConfig


def build_optimizer(cfg: RecipeConfig, model_chunks: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, m = cfg.optimizer, cfg.model
    config = OptimizerConfig(
        optimizer=o.type, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum, clip_grad=o.clip_grad,
        bf16=m.precision == "bf16", fp16=m.precision == "fp16",
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(cfg: RecipeConfig, optimizer):
    """Linear warmup from 0, then cosine/linear/constant decay to min_lr, stepped once per
    optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, s = cfg.optimizer, cfg.schedule
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=s.lr_decay_steps, lr_decay_style=s.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=s.train_steps,
        wd_incr_style="constant",
    )
