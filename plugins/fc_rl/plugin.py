"""FC-RL, foresight-conditioned RL, as an on-policy stage plugin.

Its tasks are the recipe's task sets (`tasks:`): each step draws `prompts_per_step` tasks per
data-parallel rank from the `train` split of the sets, each set by its weight, and `collect`
runs, one named call each:

    play (G episodes per task, the KV-cache agent loop, temperature / top-p)
    -> score_rewards (every weighted reward term of `fc_rl.reward_weights`: `rl.rewards`)
    -> samples (token in, token out: the ids trained on are the ids sampled)
    -> recompute (log-probs of the sampling policy, its critic's values, the reference's)
    -> advantages (the algorithm of `fc_rl.algorithm`: GRPO, RLOO, PPO; `rl.algorithms`)

The framework then takes `epochs` passes of optimizer steps over the episodes,
`schedule.global_batch_size` episodes per step, with `loss` below: the clipped policy loss on the
agent's tokens, KL to the frozen reference when `kl_coef` > 0, and the algorithm's own terms."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from megatron_foresight.config import StageConfig
from megatron_foresight.configtree import check
from megatron_foresight.eval.agent_eval import score_episodes, scores_by_set
from megatron_foresight.inference.agent import run_episodes
from megatron_foresight.inference.generate import Generator, Sampling
from megatron_foresight.models.provider import LogitTemperature, mask_padded_vocab
from megatron_foresight.rl.advantages import groups_with_signal
from megatron_foresight.rl.algorithms import AlgorithmConfig, GRPOConfig, build_algorithm
from megatron_foresight.rl.loss import masked_sums, per_token_policy_loss, truncated_is_weights
from megatron_foresight.rl.rewards import REWARD_TERMS, RewardSettings
from megatron_foresight.rl.rollout import score_rewards, to_sample
from megatron_foresight.tasksets import TaskSets
from megatron_foresight.training.data import collate, to_device
from megatron_foresight.training.plugin import (
    BuildContext, OnPolicyStage, StagePlan, StageRuntime,
)

log = logging.getLogger(__name__)


@dataclass
class Config(StageConfig):
    """Foresight-conditioned RL on the recipe's task sets (`tasks:`)."""

    algorithm: AlgorithmConfig = field(default_factory=GRPOConfig)
    """How rewards become advantages: {type: grpo}, {type: rloo}, {type: ppo, gae_lambda: ...},
    or one a module in `extensions` registers; a bare name takes its defaults."""
    split: str = "train"
    """The split of the task sets the policy trains on."""
    prompts_per_step: int = 4
    """Tasks per step and data-parallel rank; each is played group_size times."""
    group_size: int = 4
    """G: samples per task, normalized against each other (group algorithms; PPO may use 1)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts. Below 1 the samples succeed more often (more
    groups with task signal: `rollout/task_signal_groups`). The ratio and the loss use the
    untempered policy's log-probs unless `tempered_policy` is on, and `logprob_gap_mean` is
    logged only where the trainer's log-probs are the sampler's (top_p 1.0, and temperature
    1.0 or `tempered_policy`)."""
    tempered_policy: bool = False
    """Train the policy the rollouts sample from: the log-prob recomputation, the loss and the
    KL reference divide the logits by `temperature` (as verl and TRL do), so the importance
    ratio starts from the sampler's own log-probs at any temperature. Off: the untempered
    policy's log-probs (the same at temperature 1.0)."""
    top_p: float = 1.0
    max_new_tokens: int = 320
    """Per agent turn; a turn that reaches it is cut (and scores as malformed)."""
    epochs: int = 1
    """Passes over each step's episodes (optimizer steps per pass: episodes / global batch)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    """Clip of the importance ratio: [1 - clip_low, 1 + clip_high]."""
    kl_coef: float = 0.0
    """Weight of KL(policy || reference); the reference is checkpoint.init_from, frozen."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    aggregation: Literal["token", "sequence"] = "token"
    """Mean over every agent token of the batch, or per episode first."""
    calibration_rule: Literal["brier", "log"] = "brier"
    """The proper scoring rule of the `calibration` term."""
    reward_weights: dict[str, float] = field(default_factory=lambda: {
        "task": 1.0, "calibration": 0.5, "fidelity": 0.5, "format": 0.5})
    """Weight of each reward term (rl.rewards: task, calibration, fidelity, format, or one a
    module in `extensions` registers); terms not named are not scored."""
    tis_cap: Optional[float] = None
    """Truncated importance sampling: weight each token by min(pi_old / pi_rollout, cap), for
    rollouts drawn by another engine than the trainer's; null: off."""
    validation_tasks: int = 16
    """Validation tasks played greedily at each evaluation (val/ metrics), taken from the task
    sets' `validation` splits in turn."""
    rollout: Literal["continuous", "rounds"] = "continuous"
    """How a step's episodes share the decode batch. `continuous`: each episode holds a
    KV-cache slot; a turn that ends goes to its environment off the decode thread while the
    other slots decode, and only the observation is prefilled (inference.continuous).
    `rounds`: every episode advances one turn per batch and the batch waits for its longest
    turn. Rows draw from per-episode streams either way: the same episodes, at another speed
    (benchmarks/rollout_throughput.py)."""
    cuda_graphs: bool = False
    """Replay the continuous rollout's decode step as CUDA graphs, one per key-length bucket
    (inference.graphs): one launch per token instead of one per kernel. GPU, continuous
    rollout and pipeline parallelism 1 only; run once on one H200 at TP 1 (single-turn decode
    and `tests/test_cuda.py`, inference.graphs), not on FC-RL's multi-turn episodes or with
    TP > 1 there, so off by default."""

    def check_recipe(self, cfg) -> None:
        """What FC-RL needs of the rest of the recipe; run whenever the recipe loads, so
        `foresight config` and `plan` refuse what training would, before a job is queued."""
        check(bool(cfg.tasks), "tasks", "FC-RL plays the recipe's task sets: list them under "
              "tasks: (e.g. [{env: search, world: true}] for the built-in world)")
        missing = [t.name for t in cfg.tasks if self.split not in t.files]
        check(not missing, "tasks", f"FC-RL trains on the {self.split!r} split of every task "
              f"set; {', '.join(missing)} has none (or set fc_rl.split)")
        check(not self.validation_tasks or any("validation" in t.files for t in cfg.tasks),
              "fc_rl.validation_tasks", "validation plays the task sets' validation splits, "
              "and none has one; add one, or set fc_rl.validation_tasks: 0")
        check((cfg.parallel.virtual_pipeline_model_parallel_size or 1) == 1,
              "parallel.virtual_pipeline_model_parallel_size",
              "FC-RL rollouts run one model chunk per pipeline stage; set it to null (plain "
              "1F1B pipelining)")
        check(cfg.model.fp8 is None, "model.fp8",
              "FC-RL samples without FP8 (decode batches do not have the row counts FP8 "
              "GEMMs need) and would train in it, so the log-prob ratios would compare two "
              "precisions; set model.fp8: null for this stage")
        check(not self.cuda_graphs or self.rollout == "continuous", "fc_rl.cuda_graphs",
              "CUDA graphs replay the continuous rollout's decode step: set fc_rl.rollout: "
              "continuous, or fc_rl.cuda_graphs: false")
        check(not self.cuda_graphs or cfg.parallel.pipeline_model_parallel_size == 1,
              "fc_rl.cuda_graphs", "CUDA graphs of the decode step need "
              "parallel.pipeline_model_parallel_size 1 (a stage hand-off reads a shape on the "
              "host); set fc_rl.cuda_graphs: false")
        episodes, mbs = self.prompts_per_step * self.group_size, cfg.schedule.micro_batch_size
        check(episodes % mbs == 0, "schedule.micro_batch_size",
              f"the pipelined log-prob passes need equal microbatches: each rank's {episodes} "
              f"episodes per step (fc_rl.prompts_per_step x group_size) must be a multiple of "
              f"{mbs}")
        check(self.kl_coef == 0 or bool(cfg.checkpoint.init_from), "fc_rl.kl_coef",
              "KL needs a reference model: set checkpoint.init_from (the FE-SFT run)")
        self.algorithm.check_recipe(cfg)
        blind = sorted(n for n in self.reward_weights
                       if REWARD_TERMS[n].credit not in ("episode", "turn"))
        check(cfg.format.foresight or not blind, "fc_rl.reward_weights",
              f"foresight_format: none writes no foresight, so {', '.join(blind)} would score "
              "nothing; weigh only terms of whole turns or episodes (task, format)")

    def __post_init__(self):
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "epochs"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        need = self.algorithm.min_group_size
        check(self.group_size >= need, "group_size",
              f"{self.algorithm.type} needs at least {need} samples per task")
        check(self.temperature > 0, "temperature", "RL samples; must be > 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.clip_low >= 0 and self.clip_high >= 0, "clip_low", "clips are >= 0")
        check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        unknown = sorted(set(self.reward_weights) - set(REWARD_TERMS))
        check(not unknown, "reward_weights", f"unknown term(s) {unknown}; registered: "
              f"{', '.join(REWARD_TERMS)}")
        check(self.tis_cap is None or self.tis_cap >= 1, "tis_cap", "null or >= 1")
        check(self.validation_tasks >= 0, "validation_tasks", "must be >= 0")


def _recompute(model, batches: list[dict], value_head=None) -> list[dict]:
    """Per microbatch of `batches`: log p(labels) under `model` ("logprobs", [B, S]) and, with a
    value head, its values ("values"), on the CPU (where samples live). The forward runs through
    Megatron's schedule, forward only, so it is pipelined like training; the results exist on
    the last pipeline stage only (the others return [])."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device

    def step(data_iterator, chunk):
        batch = to_device(next(data_iterator), device)
        per_token_ce = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def keep(ce):
            out = {"logprobs": -ce.detach().float().cpu()}
            if value_head is not None:
                out["values"] = value_head.last.detach().cpu()
            return ce.new_zeros(()), torch.ones((), dtype=torch.int), out
        return per_token_ce, keep

    tokens = batches[0]["tokens"]
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(batches), model=model,
        num_microbatches=len(batches), seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0], forward_only=True)


class ForesightRLStage(OnPolicyStage):
    Config = Config

    def __init__(self, cfg):
        super().__init__(cfg)
        self.algorithm = build_algorithm(self.stage.algorithm, self.stage.reward_weights)
        self.settings = RewardSettings(self.stage.calibration_rule)
        self.reference = None
        self.tempering = None  # LogitTemperature of the policy with tempered_policy

    @property
    def epochs(self) -> int:
        return self.stage.epochs

    @classmethod
    def pipeline_overrides(cls) -> list[str]:
        # Its in-training validation would play the same validation tasks greedily that the
        # pipeline's evaluations play after FE-SFT and after FC-RL.
        return ["fc_rl.validation_tasks=0"]

    @classmethod
    def plan_memory(cls, cfg, weight_bytes: int, layers: int, half: bool) -> StagePlan:
        """The frozen reference's weights (with KL), and the rollout's KV cache: every episode of
        a step decoded at once, up to the whole sequence."""
        s, m, tp = cfg.stage_config, cfg.model, cfg.parallel.tensor_model_parallel_size
        rows = s.prompts_per_step * s.group_size
        return StagePlan(reference_model=weight_bytes if s.kl_coef > 0 else 0,
                         kv_cache=(2 * layers * rows * cfg.data.seq_length * (m.query_groups // tp)
                                   * m.head_dim * (2 if half else 4)))

    @classmethod
    def plan_step(cls, cfg, dp: int) -> tuple[int, int, int]:
        """A rollout step: generation and the log-prob recomputation (and the reference's) are
        forward passes; `epochs` training passes."""
        s = cfg.stage_config
        return (s.prompts_per_step * s.group_size * dp * cfg.data.seq_length, s.epochs,
                2 + (1 if s.kl_coef > 0 else 0))

    def setup(self, ctx: BuildContext) -> None:
        self.tokenizer = ctx.tokenizer
        self.task_sets = TaskSets.of(self.cfg)
        self.task_sets.prepare(ctx.cache_dir, ctx.progress)

    def extend_model(self, chunks: list, ctx) -> tuple[str, ...]:
        """Padded vocabulary rows get -inf logits (the sampler never draws them), so trained and
        sampled log-probabilities agree; then what the algorithm adds (PPO's critic)."""
        mask_padded_vocab(chunks[-1], self.tokenizer.vocab_size)
        if self.stage.tempered_policy:
            self.tempering = LogitTemperature(chunks[-1], self.stage.temperature)
        return self.algorithm.extend_model(chunks, ctx)

    def _sampling(self):
        """Where the policy samples or plays greedily: its plain logits (the sampler divides
        by the temperature itself)."""
        return self.tempering.off() if self.tempering else contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------
    # rollout

    def _tasks_for(self, step: int, dp_rank: int, dp_size: int):
        """This rank's tasks at `step`: a seeded draw over the task sets by weight, the same on
        every rank (each takes its share), so a resumed run plays the same ones."""
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        n = self.stage.prompts_per_step
        drawn = self.task_sets.draw(self.stage.split, n * dp_size, rng)
        return drawn[dp_rank * n:(dp_rank + 1) * n]

    def _reference(self, rt: StageRuntime):
        if self.reference is None:
            from megatron_foresight.models.provider import build_model
            from megatron_foresight.training import checkpoint as ckpt

            chunks = build_model(self.cfg, self.cfg.padded_vocab_size(self.tokenizer.vocab_size),
                                 rt.ctx.pg_collection)
            mask_padded_vocab(chunks[-1], self.tokenizer.vocab_size)
            if self.stage.tempered_policy:  # KL between the tempered policies
                LogitTemperature(chunks[-1], self.stage.temperature)
            ckpt.load_checkpoint(ckpt.find_checkpoint(self.cfg.checkpoint.init_from),
                                 chunks=chunks, ctx=rt.ctx)
            self.reference = chunks[0].eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        return self.reference

    def _generator(self, model) -> Generator:
        return Generator(model, self.tokenizer, max_sequence_length=self.cfg.data.seq_length,
                         pad_id=self.tokenizer.eod, cuda_graphs=self.stage.cuda_graphs)

    def _play(self, rt: StageRuntime, tasks) -> list:
        s = self.stage
        sampling = Sampling(temperature=s.temperature, top_p=s.top_p,
                            max_new_tokens=s.max_new_tokens,
                            seed=self.cfg.seed + 1_000_003 * rt.step + 101 * rt.ctx.dp_rank)
        with torch.no_grad(), self._sampling():
            return run_episodes(self._generator(rt.chunks[0]),
                                [t for t in tasks for _ in range(s.group_size)],
                                self.task_sets.make_env, sampling,
                                batch_size=len(tasks) * s.group_size, progress=False,
                                fmt=self.cfg.format, continuous=s.rollout == "continuous",
                                row_streams=True)

    def _recompute_logprobs(self, rt: StageRuntime, samples: list[dict]) -> dict[str, float]:
        """The sampling policy's log-probs (and critic values), and the reference's, on each
        sample of the last pipeline stage (where the loss runs), before any update; the gap to
        the sampler's own log-probs."""
        mbs = self.cfg.schedule.micro_batch_size
        batches = [collate(samples[i:i + mbs]) for i in range(0, len(samples), mbs)]
        value_head = self.algorithm.value_head if self.algorithm.needs_values else None
        with torch.no_grad():
            policy = _recompute(rt.chunks[0], batches, value_head)
            reference = _recompute(self._reference(rt), batches) if self.stage.kl_coef else None
        gap_sum = gap_max = count = 0.0
        for m, batch in enumerate(batches if policy else []):
            for j, sample in enumerate(samples[m * mbs:(m + 1) * mbs]):
                sample["old_logprobs"] = policy[m]["logprobs"][j]
                if value_head is not None:
                    sample["old_values"] = policy[m]["values"][j]
                if reference is not None:
                    sample["ref_logprobs"] = reference[m]["logprobs"][j]
            mask = batch["loss_mask"] > 0
            gap = (policy[m]["logprobs"] - batch["rollout_logprobs"]).abs()[mask]
            if gap.numel():
                gap_sum += gap.sum().item()
                gap_max = max(gap_max, gap.max().item())
                count += gap.numel()
        if not count or self.stage.top_p != 1.0 or (
                self.stage.temperature != 1.0 and not self.stage.tempered_policy):
            return {}  # comparable only where the trainer scores the distribution drawn from
        return {"logprob_gap_mean": gap_sum / count, "logprob_gap_max": gap_max}

    def collect(self, rt: StageRuntime) -> tuple[list[dict], dict[str, float]]:
        """Play this step's episodes; return their training samples and rollout metrics."""
        model = rt.chunks[0]
        model.eval()
        started = time.perf_counter()
        tasks = self._tasks_for(rt.step, rt.ctx.dp_rank, rt.ctx.dp_size)
        records = self._play(rt, tasks)
        generated = time.perf_counter()
        scored = score_rewards(records, self.stage.reward_weights, self.tokenizer,
                               self.settings, self.cfg.format)
        samples = [to_sample(x, self.cfg.data.seq_length, self.tokenizer.eod) for x in scored]
        metrics = self._recompute_logprobs(rt, samples)
        if "old_logprobs" in samples[0]:  # the last pipeline stage, where the loss runs
            metrics.update(self.algorithm.advantages(scored, samples, self.stage.group_size))
        model.train()
        metrics.update(self._rollout_metrics(scored, tasks))
        metrics.update({"time/generate_s": generated - started,
                        "time/logprobs_s": time.perf_counter() - generated})
        return samples, metrics

    def _rollout_metrics(self, scored, tasks) -> dict[str, float]:
        records = [x.record for x in scored]
        metrics = {f"reward/{k}": sum(x.rewards[k] for x in scored) / len(scored)
                   for k in scored[0].rewards}
        episodes = score_episodes(records, self.cfg.format)
        metrics.update({"rollout/format_validity": episodes["format_validity"],
                        "rollout/turns_per_episode": episodes["turns_per_episode"],
                        "rollout/agent_tokens": sum(len(t.ids) for r in records
                                                    for t in r.turns) / len(records),
                        # groups whose task rewards differ: all the task reward teaches GRPO
                        "rollout/task_signal_groups": groups_with_signal(
                            [r.reward for r in records], self.stage.group_size)})
        if episodes["value_brier"] is not None:
            metrics["rollout/value_brier"] = episodes["value_brier"]
        for task in tasks:  # how the draw by weight fell this step
            key = f"rollout/tasks/{task.task_set}"
            metrics[key] = metrics.get(key, 0) + 1
        return metrics

    # ----------------------------------------------------------------------------------------
    # loss

    def loss(self, batch: dict, per_token_ce: torch.Tensor):
        s = self.stage
        mask = batch["loss_mask"].float()
        is_weights = (None if s.tis_cap is None else truncated_is_weights(
            batch["old_logprobs"].float(), batch["rollout_logprobs"].float(), s.tis_cap))
        per_token, parts = per_token_policy_loss(
            -per_token_ce.float(), batch["old_logprobs"].float(), batch["advantages"].float(),
            s.clip_low, s.clip_high, batch["ref_logprobs"].float() if s.kl_coef else None,
            s.kl_coef, s.kl_estimator, is_weights)
        n = mask.sum()
        pair = lambda x: torch.stack([(x * mask).sum(), n])  # noqa: E731
        metrics = {"policy_loss": pair(per_token.detach()), "clip_fraction": pair(parts["clipped"]),
                   "ratio_mean": pair(parts["ratio"])}
        extra, extra_metrics = self.algorithm.loss(batch)
        per_token = per_token + extra
        metrics.update({k: pair(v) for k, v in extra_metrics.items()})
        # the framework divides the sum by the count summed over microbatches and ranks
        loss_sum, count = masked_sums(per_token, mask, s.aggregation)
        if "kl" in parts:
            metrics["kl"] = pair(parts["kl"])
        return loss_sum, count.int(), metrics

    # ----------------------------------------------------------------------------------------
    # validation

    def validate(self, rt: StageRuntime) -> dict[str, float]:
        """Greedy episodes on the validation tasks: the eval metrics and the mean reward."""
        n = self.stage.validation_tasks
        if not n:
            return {}
        model = rt.chunks[0]
        model.eval()
        tasks = self.task_sets.tasks("validation", n)
        with torch.no_grad(), self._sampling():
            records = run_episodes(self._generator(model), tasks, self.task_sets.make_env,
                                   Sampling(max_new_tokens=self.stage.max_new_tokens),
                                   batch_size=len(tasks), progress=False, fmt=self.cfg.format,
                                   continuous=self.stage.rollout == "continuous")
        model.train()
        scores = {**score_episodes(records, self.cfg.format),
                  **scores_by_set(records, self.task_sets, self.cfg.format)}
        out = {f"val/{k}": v for k, v in scores.items() if v is not None}
        return {**out, **self.reward_metrics(records)}

    def reward_metrics(self, records, prefix: str = "val") -> dict[str, float]:
        """The mean reward of played episodes (`PREFIX/reward/TERM`, and total) under this
        recipe's weights: `foresight eval` adds them to the episodes it plays (prefix: the task
        split) instead of playing the validation tasks a second time."""
        scored = score_rewards(records, self.stage.reward_weights, self.tokenizer,
                               self.settings, self.cfg.format)
        return {f"{prefix}/reward/{k}": sum(x.rewards[k] for x in scored) / len(scored)
                for k in scored[0].rewards}


STAGE = ForesightRLStage
