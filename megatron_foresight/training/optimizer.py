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
    if cfg.parallel.use_distributed_optimizer:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        _leave_step_alone_when_loading(DistributedOptimizer)  # see ensure_adam_state
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(cfg: RecipeConfig, optimizer):
    """Linear warmup from 0, then cosine/linear/constant decay to min_lr, or wsd (Megatron's
    WSD: constant, then a cosine anneal), stepped once per optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, s = cfg.optimizer, cfg.schedule
    wsd = s.decay_style == "wsd"
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=s.lr_decay_steps, lr_decay_style="WSD" if wsd else s.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=s.train_steps,
        wd_incr_style="constant",
        **({"wsd_decay_steps": s.lr_anneal_steps, "lr_wsd_decay_style": "cosine"} if wsd else {}),
    )


def ensure_adam_state(optimizer) -> None:
    """Make a distributed optimizer whose inner optimizer is torch's Adam checkpointable before
    its first step, and loadable at all (with `_leave_step_alone_when_loading`, which
    build_optimizer installs on the class).

    Without Apex or Transformer Engine (the CPU; torch's Adam anywhere) Megatron-Core 0.16's
    distributed optimizer cannot save before its first step or load its own checkpoints, for
    three reasons fixed here. `state_dict()` reads the step count from per-parameter state that
    torch's Adam creates only at its first step (`assert len(steps) == 1`), so that state is
    created now, as zeros at step 0 (what torch's Adam itself starts from; a load overwrites
    it). The parameter-state loaders copy every entry of the destination state, `step` included,
    from a source that has no `step` (`KeyError: 'step'`) or, with dp_reshardable, a stale one:
    the copy is told to leave `step` alone, since the step comes from the param groups. And that
    step is one tensor shared by every parameter, which torch's Adam then increments once per
    parameter: each parameter gets its own copy. (The copy also runs under no_grad: with fp32
    weights the main parameters are the model's own, and dp_reshardable loading copied into
    them with autograd on.)"""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not (isinstance(opt, DistributedOptimizer)
                and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if "step" not in inner.state[p]:  # a defaultdict: may hold empty entries
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _leave_step_alone_when_loading(cls) -> None:
    import torch

    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_foresight_fixed", False):
        return

    @torch.no_grad()
    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(self, model_param, {k: v for k, v in tensors.items() if k != "step"})
        finally:
            if step is not None:
                state["step"] = step.clone()

    set_states._foresight_fixed = True
    cls._set_main_param_and_optimizer_states = set_states
