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


def prepare_for_load(optimizer) -> None:
    """Make a fresh distributed optimizer loadable when its inner optimizer is torch's Adam.

    Without Apex or Transformer Engine (the CPU; torch's Adam anywhere) Megatron-Core 0.16's
    distributed optimizer cannot load its own checkpoints, for two reasons fixed here:
    `state_dict()` reads the step count from per-parameter state that torch's Adam creates only
    at its first step (`assert len(steps) == 1` on a fresh one), so zero state is allocated
    (the load overwrites it); and the parameter-state loaders skip torch's `step` entry but then
    copy every entry of the destination state, `step` included (`KeyError: 'step'`), so the
    copy is told to leave `step` alone (it comes from the param groups). And the step it sets
    from the param groups is one tensor shared by every parameter, which torch's Adam then
    increments once per parameter: each parameter gets its own copy."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _leave_step_alone_when_loading(DistributedOptimizer)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not (isinstance(opt, DistributedOptimizer)
                and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and not inner.state):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def _leave_step_alone_when_loading(cls) -> None:
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_foresight_fixed", False):
        return

    def set_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step.clone()

    set_states._foresight_fixed = True
    cls._set_main_param_and_optimizer_states = set_states
