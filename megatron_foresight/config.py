"""The recipe schema: one dataclass per section, each validating its own fields.

A recipe YAML maps one-to-one onto `RecipeConfig`; the section named after the stage (for
example `lm:`) is the stage plugin's own config class. Checks that involve one section live in its
`__post_init__`; checks across sections live in `RecipeConfig.__post_init__`; checks that need
the world size (known from the launcher's environment before any process group starts) live in
`RecipeConfig.check_world_size`. The field docstrings are the documentation: `foresight config
--keys` prints them.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from megatron_foresight.configtree import (
    ConfigError, apply_overrides, build, check, check_at_least, describe, load_yaml,
    nearest_origin, to_dict,
)
from megatron_foresight.data.tokenizer import TokenizerConfig
from megatron_foresight.envs import registry
from megatron_foresight.foresight.formats import ForesightFormat, get_format
from megatron_foresight.errors import UsageError
from megatron_foresight.world.tasksets import world_task_set
from megatron_foresight.presets import PRESETS


@dataclass
class ModelConfig:
    """The transformer (a Megatron-Core GPTModel)."""

    preset: Optional[str] = None
    """Start from a named shape (presets.py); keys set beside it override the preset."""
    family: Literal["llama", "qwen2"] = "llama"
    """Architecture family, which fixes the Hugging Face mapping used by conversion."""
    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 256
    """Model width."""
    ffn_hidden_size: int = 704
    """Width of the MLP (per SwiGLU branch)."""
    num_attention_heads: int = 8
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; null means one per query head."""
    kv_channels: Optional[int] = None
    """Head dimension; null means hidden_size / num_attention_heads."""
    vocab_size: Optional[int] = None
    """Vocabulary size; null takes it from the tokenizer."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this; must be divisible by the TP size, so the
    padded size (and the initial weights) do not change with the parallel layout."""
    max_position_embeddings: int = 1024
    """Longest sequence the position encoding is set up for."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalization layer."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalization layers."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """MLP activation; swiglu is a gated SiLU (Llama, Qwen)."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projection (Qwen2)."""
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """Position encoding."""
    rotary_base: int = 10_000
    """RoPE base frequency."""
    rope_scaling: bool = False
    """Llama-3.1 style RoPE frequency scaling."""
    rope_scaling_factor: float = 8.0
    """Factor of the Llama-3.1 RoPE scaling."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output layer (false ties them)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialization."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Parameter and compute precision; the optimizer keeps fp32 master weights for bf16/fp16.
    auto: bf16 on CUDA; on a CPU, bf16 only if a short probe of this model's matmuls runs at
    least 1.1x faster in it than in fp32 (it depends on the chip), else fp32. The probe's result
    is cached per machine (FORESIGHT_CACHE_DIR, else ~/.cache/megatron-foresight) and the choice
    is written to the run's config.yaml and checkpoints (runtime/precision.py)."""
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    """Transformer Engine FP8 format (CUDA only); hybrid = E4M3 forward, E5M2 backward."""
    fp8_amax_history_len: int = 1024
    """FP8 delayed scaling: how many steps of amax history to keep."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """FP8 delayed scaling: how the scale is chosen from the amax history."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: auto picks Transformer Engine on CUDA when it imports, else local."""
    local_core_attention: Literal["sdpa", "megatron"] = "sdpa"
    """Core attention of the local (non Transformer Engine) layers: torch's fused
    scaled_dot_product_attention, or Megatron-Core's unfused DotProductAttention (slower)."""
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    """Activation recomputation: selective (attention core) or full (whole layers)."""
    recompute_num_layers: int = 1
    """With full recomputation: layers per recomputed chunk."""
    init_on_cpu: Optional[bool] = None
    """Initialize weights on the CPU, full-size then split, so the initial model does not depend
    on the TP/PP layout; null means yes without CUDA, no with CUDA (faster on GPUs)."""
    precision_choice: object = field(default=None, init=False, repr=False, compare=False)
    """How `precision: auto` was resolved on this machine (runtime/precision.py sets it, and
    `precision` to the choice); None when the recipe named a precision."""

    def __post_init__(self):
        check_at_least(self, 1, "num_layers", "hidden_size", "ffn_hidden_size",
                       "num_attention_heads", "num_query_groups", "kv_channels", "vocab_size",
                       "make_vocab_size_divisible_by", "max_position_embeddings", "rotary_base",
                       "fp8_amax_history_len", "recompute_num_layers")
        groups = self.query_groups
        check(self.num_attention_heads % groups == 0, "num_query_groups",
              f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
              f"num_query_groups ({groups})")
        if self.kv_channels is None:
            check(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                  f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                  f"({self.num_attention_heads}), or set kv_channels")
        check(self.norm_epsilon > 0, "norm_epsilon", f"must be positive, got {self.norm_epsilon}")
        check(self.rope_scaling_factor > 0, "rope_scaling_factor",
              f"must be positive, got {self.rope_scaling_factor}")
        check(0.0 <= self.hidden_dropout < 1.0, "hidden_dropout",
              f"must be in [0, 1), got {self.hidden_dropout}")
        check(0.0 <= self.attention_dropout < 1.0, "attention_dropout",
              f"must be in [0, 1), got {self.attention_dropout}")
        check(self.init_method_std > 0, "init_method_std",
              f"must be positive, got {self.init_method_std}")
        check(self.fp8 is None or self.transformer_impl != "local", "fp8",
              "FP8 needs transformer_impl: transformer_engine (or auto on a CUDA machine)")
        check(self.fp8 is None or self.precision != "fp32", "fp8",
              "FP8 runs inside a bf16 (or fp16) model: set model.precision: bf16 (auto is "
              "bf16 on CUDA, where FP8 runs)")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """How the model and data are split over processes. The data-parallel size is what is left:
    world_size / (tensor * pipeline * context)."""

    tensor_model_parallel_size: int = 1
    """Tensor parallelism: each layer's matrices split over this many processes."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallelism: layers split into this many stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline: model chunks per pipeline stage."""
    context_parallel_size: int = 1
    """Context parallelism (the sequence split over processes): only 1 for now."""
    expert_model_parallel_size: int = 1
    """Expert parallelism for mixture-of-experts models."""
    sequence_parallel: bool = False
    """Split norms and dropout along the sequence within the tensor-parallel group."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient all-reduce with the backward pass."""
    distributed_timeout_minutes: int = 30
    """How long a collective may wait before the job fails."""

    def __post_init__(self):
        check_at_least(self, 1, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                       "virtual_pipeline_model_parallel_size", "context_parallel_size",
                       "expert_model_parallel_size", "distributed_timeout_minutes")
        vpp = self.virtual_pipeline_model_parallel_size
        check(vpp is None or self.pipeline_model_parallel_size > 1,
              "virtual_pipeline_model_parallel_size",
              "an interleaved pipeline needs pipeline_model_parallel_size > 1")
        check(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
              "sequence_parallel", "needs tensor_model_parallel_size > 1")
        # Megatron would build the context-parallel groups, but the training loop, collect and
        # generation give every rank the whole sequence rather than its chunks of it: the
        # attention would be wrong and nothing would say so.
        check(self.context_parallel_size == 1, "context_parallel_size",
              f"{self.context_parallel_size} is not supported yet: the training loop does not "
              "split sequences over context-parallel ranks; use 1 (tensor parallelism with "
              "sequence_parallel, and activation recomputation, for long sequences)")

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)


@dataclass
class OptimizerConfig:
    """The optimizer (Megatron-Core's, with fp32 master weights)."""

    type: Literal["adam", "sgd"] = "adam"
    """Adam is AdamW (decoupled weight decay)."""
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay; norms and biases are exempt."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.95
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    sgd_momentum: float = 0.9
    """SGD momentum."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    skip_nonfinite: int = 0
    """Steps with a non-finite loss or gradient norm (NaN, inf) the run may skip over its whole
    length (no update; counted as `nonfinite_skipped` in the metrics) before it stops; 0 stops
    at the first, before anything is saved."""

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check_at_least(self, 0, "skip_nonfinite")
        check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.weight_decay >= 0, "weight_decay",
              f"must be non-negative, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2", "sgd_momentum"):
            value = getattr(self, name)
            check(0 <= value < 1, name, f"must be in [0, 1), got {value}")
        check(self.adam_eps > 0, "adam_eps", f"must be positive, got {self.adam_eps}")
        check(self.clip_grad >= 0, "clip_grad",
              f"must be non-negative (0 disables clipping), got {self.clip_grad}")


@dataclass
class ScheduleConfig:
    """Steps, batch sizes and the learning-rate schedule."""

    train_steps: int = 100
    """Optimizer steps to train for."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass; gradients accumulate to the global batch."""
    warmup_steps: int = 10
    """Linear warmup from 0 to optimizer.lr."""
    decay_style: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Decay from optimizer.lr to optimizer.min_lr after warmup. wsd (warmup-stable-decay):
    the LR stays at optimizer.lr and falls (cosine) to min_lr over the last `anneal_steps`
    of the decay; for a skill that arrives late, as a transition at a high LR (README, the
    tiny agent)."""
    decay_steps: Optional[int] = None
    """Steps over which the decay runs (counting warmup); null means train_steps."""
    anneal_steps: Optional[int] = None
    """decay_style: wsd only: the closing steps of the decay in which the LR falls; at most
    the decay's steps after warmup (a run shortened on the command line anneals over all)."""
    eval_interval: int = 0
    """Evaluate on the validation split every this many steps (0: only at the end)."""
    eval_steps: int = 2
    """Validation batches per evaluation (0 disables evaluation)."""
    eval_at_start: bool = False
    """Also evaluate before the first step, logged as step 0: the starting point the later
    evaluations compare with."""

    def __post_init__(self):
        check_at_least(self, 1, "train_steps", "global_batch_size", "micro_batch_size",
                       "decay_steps")
        check_at_least(self, 0, "eval_interval", "eval_steps")
        check(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
              f"global_batch_size ({self.global_batch_size}) must be a multiple of "
              f"micro_batch_size ({self.micro_batch_size})")
        check(0 <= self.warmup_steps < self.lr_decay_steps, "warmup_steps",
              f"must be in [0, decay_steps={self.lr_decay_steps}), got {self.warmup_steps}")
        if self.decay_style == "wsd":
            check(self.anneal_steps is not None and self.anneal_steps >= 1, "anneal_steps",
                  f"decay_style: wsd needs anneal_steps >= 1 (the closing steps of the decay "
                  f"in which the LR falls), got {self.anneal_steps}")
        else:
            check(self.anneal_steps is None, "anneal_steps",
                  f"only decay_style: wsd anneals; decay_style is {self.decay_style} "
                  "(remove anneal_steps or set decay_style: wsd)")

    @property
    def lr_decay_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.train_steps

    @property
    def lr_anneal_steps(self) -> int | None:
        """wsd's anneal_steps, capped at the decay's steps after warmup."""
        if self.anneal_steps is None:
            return None
        return min(self.anneal_steps, self.lr_decay_steps - self.warmup_steps)


@dataclass
class DataConfig:
    """What the data loaders share; each stage's section says which data to read."""

    seq_length: int = 256
    """Tokens per training sequence."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer."""
    cache_dir: Optional[str] = None
    """Where tokenized datasets and their indices are cached; null means <runs_root>/cache."""
    num_workers: int = 2
    """Background processes that read and batch samples (0 reads in the training process)."""
    world: Optional[str] = None
    """Directory of a built-in world (`foresight data build-world`): its trajectories, tasks and
    tokenizer are what the agent stages read by default. If it does not exist, it is built
    there on first use (default sizes, the recipe's seed; about half a minute)."""
    document_masks: bool = False
    """Training sequences are packed from several documents (trajectories, passages): with
    this on, each token attends only to earlier tokens of its own document (Megatron's
    `reset_attention_mask`, a [seq, seq] mask per sample), as it does when the model plays one
    episode alone; off, a document also sees the tail of the one packed before it. Training on
    the local spec's SDPA attention attends document by document (the causal kernel on each):
    on 2 CPU cores FE-SFT's step as fast as without the mask, WM-AMT's 0.91x (not measured on a
    GPU). RoPE is relative, so positions need no reset. On Transformer Engine a microbatch is
    one packed row with its documents' (THD) boundaries instead of the mask."""

    def __post_init__(self):
        check_at_least(self, 2, "seq_length")
        check_at_least(self, 0, "num_workers")
        check(self.tokenizer.type != "sentencepiece" or bool(self.tokenizer.path or self.world),
              "tokenizer.path", "type sentencepiece needs the path of a .model file (or set "
              "data.world to use the built-in world's tokenizer)")

    def tokenizer_config(self) -> TokenizerConfig:
        """The tokenizer section with the world's tokenizer filled in where it is meant."""
        if self.tokenizer.type == "sentencepiece" and not self.tokenizer.path:
            return TokenizerConfig("sentencepiece", str(Path(self.world) / "tokenizer" /
                                                        "spm.model"))
        return self.tokenizer


@dataclass
class StageConfig:
    """Base of every stage's recipe section (a stage plugin's `Config`)."""

    def check_recipe(self, cfg: "RecipeConfig") -> None:
        """Checks of this stage that involve the rest of the recipe: run whenever a recipe
        loads, before any process starts; raise `ConfigError` naming the key."""


@dataclass
class TaskSetConfig:
    """One set of tasks an environment plays: FC-RL trains on the `train` split of every set
    (drawn by weight), `foresight eval` plays any split and reports metrics per set."""

    env: str = "search"
    """The environment that plays these tasks, by its registered name (search, math, or one a
    module in extensions registers)."""
    name: Optional[str] = None
    """The set's name in metrics (`<name>/em`, ...); null: the environment's name."""
    splits: dict[str, str] = field(default_factory=dict)
    """Task file per split, e.g. {train: nq/train.jsonl.gz, validation: nq/dev.jsonl}: JSONL or
    .jsonl.gz in the NQ / HotpotQA / Search-R1 / TriviaQA / GSM8K / MATH layouts; the set's
    environment gives each task its type."""
    world: bool = False
    """The built-in world's tasks of this environment (data.world/tasks/<env>-<split>.jsonl)
    with the options the world was played with (its corpus, top-k, turn budgets); splits then
    stays empty, and options given here override the world's."""
    weight: float = 1.0
    """Share of FC-RL's training tasks drawn from this set (weights are normalized)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The environment's options (`foresight config --keys` lists each environment's), e.g. for
    search {corpus: wiki/psgs.jsonl, top_k: 3, max_passage_chars: 600}."""
    skip_bad: bool = False
    """Leave out task records that do not read (counted and logged, with the first few
    locations) instead of stopping at the first with its file, line and field."""
    files: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """Task file per split: `splits`, or the world's files."""
    env_options: object = field(default=None, init=False, repr=False, compare=False)
    """The options as the environment's typed config (with the world's defaults filled in)."""

    def __post_init__(self):
        try:
            registry.get(self.env)
        except UsageError as e:
            raise ConfigError("env", str(e)) from None
        self.name = self.name or self.env
        check(bool(self.name.strip()) and "/" not in self.name, "name",
              "must be a non-empty name without '/' (it prefixes metric names)")
        check(self.weight > 0, "weight", f"must be positive, got {self.weight}")
        check(not (self.world and self.splits), "splits",
              "a world set takes its files from data.world; give either world: true or splits")
        check(self.world or bool(self.splits), "splits",
              "give the task file of each split (e.g. {train: ..., validation: ...}), or "
              "world: true for the built-in world's tasks")

    def resolve(self, world: Optional[str]) -> None:
        """Fill in the world's files and options (world sets), then type the options."""
        options, self.files = dict(self.options), dict(self.splits)
        if self.world:
            check(bool(world), "world", "a world set needs data.world (the built-in world's "
                                        "directory; it is built there on first use)")
            try:
                self.files, defaults = world_task_set(world, self.env)
            except UsageError as e:
                raise ConfigError("world", str(e)) from None
            options = {**defaults, **options}
        self.env_options = build(registry.get(self.env).options, options, prefix="options")


@dataclass
class CheckpointConfig:
    """Megatron distributed checkpoints in <run_dir>/checkpoints."""

    save_interval: int = 0
    """Save every this many steps (0: only at the end). The final step is always saved."""
    keep_last: int = 2
    """How many checkpoints to keep; older ones are deleted after a newer one is complete."""
    init_from: Optional[str] = None
    """Start from the model weights of this checkpoint (a run directory or a checkpoint
    directory); optimizer and progress start fresh. Ignored when resuming."""
    save_optimizer: bool = True
    """Save optimizer state (needed to resume exactly; not needed to convert or evaluate)."""
    optimizer_sharding: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    """Distributed-optimizer state format: fully_reshardable loads at any TP/PP/DP size but
    gathers state on data-parallel rank 0 while saving; dp_reshardable saves in parallel (the
    choice for large models) but loads only at the same TP/PP size."""

    def __post_init__(self):
        check_at_least(self, 0, "save_interval")
        check_at_least(self, 1, "keep_last")


@dataclass
class LoggingConfig:
    """Where runs go and what they log."""

    runs_root: str = "runs"
    """Directory holding run directories."""
    run_name: Optional[str] = None
    """Name of the run directory; null means <recipe name>-<date>-<time>."""
    log_interval: int = 1
    """Write metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files to <run_dir>/tensorboard."""
    progress_bar: bool = True
    """Show a progress bar when the console is a terminal."""
    wandb_project: Optional[str] = None
    """Also log the TensorBoard scalars to this Weights & Biases project (needs
    `pip install -e .[wandb]`; WANDB_MODE=offline writes the run locally, for `wandb sync`
    later); null logs nowhere else."""
    wandb_entity: Optional[str] = None
    """The W&B team or user the run belongs to; null: the account's default."""
    wandb_run_name: Optional[str] = None
    """The W&B run's name; null: the run directory's name (`foresight pipeline`: the stage)."""
    wandb_group: Optional[str] = None
    """The W&B group the run joins; null: none (`foresight pipeline`: the pipeline's run
    directory, so its three stages sit together)."""

    def __post_init__(self):
        check_at_least(self, 1, "log_interval")


@dataclass
class LaunchConfig:
    """The cluster shape the recipe is laid out for: `foresight plan` checks it by default, and
    the Slurm scripts request it."""

    nodes: int = 1
    """Nodes the recipe is meant to run on."""
    gpus_per_node: int = 8
    """Processes per node, one per GPU (CPU processes on the CPU path)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU that the plan must fit in (H100 80GB; on the CPU path, the memory one
    process may use)."""
    overhead_gib: float = 5.0
    """Memory the plan sets aside per GPU for the CUDA context, NCCL buffers and allocator
    fragmentation (0 on the CPU path)."""

    def __post_init__(self):
        check_at_least(self, 1, "nodes", "gpus_per_node")
        check(self.gpu_memory_gib > 0, "gpu_memory_gib",
              f"must be positive, got {self.gpu_memory_gib}")
        check(self.overhead_gib >= 0, "overhead_gib",
              f"must be non-negative, got {self.overhead_gib}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class RecipeConfig:
    """A recipe: one stage of training at one model size."""

    stage: str = "lm"
    """The stage plugin to run (a package under plugins/); its own section has the same name."""
    seed: int = 1234
    """Seed of weights, data order and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Intended cluster shape."""
    foresight_format: Literal["v1", "v2", "none"] = "v1"
    """The version of the foresight tag set the agent writes in (`foresight/formats.py`): v1,
    a <foresight> block of plan, rollout and value; v2, the tag set a secondary summary of
    arXiv 2606.27483 reports (<imaginary>, <keyword>, <analysis>, <confidence>, <think>,
    <action>); none, no foresight (the format-free baseline: the bare task prompt, think and
    the action). FE-SFT's traces, the agent's prompts, rewards and evaluation all follow it."""
    tasks: list[TaskSetConfig] = field(default_factory=list)
    """Task sets the agent stages play: FC-RL trains on them, `foresight eval` and the
    pipeline's evaluations play them (the tiny recipes: the built-in world's search and math)."""
    extensions: list[str] = field(default_factory=list)
    """Python modules imported before the recipe is read, each registering what the recipe may
    then name: environments (`envs.registry.register`), reward terms
    (`rl.rewards.register_reward`), RL algorithms (`rl.algorithms.register_algorithm`)."""
    stage_config: object = field(default=None, init=False, repr=False, compare=False)
    name: str = field(default="recipe", init=False, compare=False)

    def __post_init__(self):
        # numpy's seeding takes 0 .. 2**32 - 1 only.
        check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        m, p = self.model, self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        check(m.num_attention_heads % tp == 0, "model.num_attention_heads",
              f"num_attention_heads ({m.num_attention_heads}) must be divisible by "
              f"tensor_model_parallel_size ({tp})")
        check(m.query_groups % tp == 0, "model.num_query_groups",
              f"num_query_groups ({m.query_groups}) must be divisible by "
              f"tensor_model_parallel_size ({tp})")
        check(m.ffn_hidden_size % tp == 0, "model.ffn_hidden_size",
              f"ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by "
              f"tensor_model_parallel_size ({tp})")
        check(m.make_vocab_size_divisible_by % tp == 0, "model.make_vocab_size_divisible_by",
              f"make_vocab_size_divisible_by ({m.make_vocab_size_divisible_by}) must be divisible "
              f"by tensor_model_parallel_size ({tp})")
        chunks = pp * (p.virtual_pipeline_model_parallel_size or 1)
        check(m.num_layers % chunks == 0, "model.num_layers",
              f"num_layers ({m.num_layers}) must be divisible by pipeline_model_parallel_size "
              f"({pp}) x virtual_pipeline_model_parallel_size "
              f"({p.virtual_pipeline_model_parallel_size or 1}) = {chunks}")
        check(self.data.seq_length <= m.max_position_embeddings, "data.seq_length",
              f"seq_length ({self.data.seq_length}) exceeds model.max_position_embeddings "
              f"({m.max_position_embeddings})")
        check(not p.sequence_parallel or self.data.seq_length % tp == 0, "data.seq_length",
              f"with sequence_parallel, seq_length ({self.data.seq_length}) must be divisible by "
              f"tensor_model_parallel_size ({tp})")
        check(p.use_distributed_optimizer is False or self.optimizer.type == "adam",
              "parallel.use_distributed_optimizer", "is supported with optimizer.type: adam")
        names = [t.name for t in self.tasks]
        for i, task_set in enumerate(self.tasks):
            check(names.index(task_set.name) == i, f"tasks[{i}].name",
                  f"two task sets are named {task_set.name!r}; give each a name")
            try:
                task_set.resolve(self.data.world)
            except ConfigError as e:
                raise ConfigError(f"tasks[{i}].{e.key}", e.message, e.where) from None

    def check_world_size(self, world_size: int) -> None:
        """Checks that need the number of processes; run before any process group starts."""
        p, s = self.parallel, self.schedule
        mp = p.model_parallel_size
        check(world_size % mp == 0, "parallel",
              f"world size ({world_size} processes) must be divisible by tensor x pipeline x "
              f"context parallel size ({p.tensor_model_parallel_size} x "
              f"{p.pipeline_model_parallel_size} x {p.context_parallel_size} = {mp})")
        dp = world_size // mp
        check(s.global_batch_size % (s.micro_batch_size * dp) == 0, "schedule.global_batch_size",
              f"global_batch_size ({s.global_batch_size}) must be a multiple of micro_batch_size "
              f"({s.micro_batch_size}) x data-parallel size ({dp}) = {s.micro_batch_size * dp}")
        vpp = p.virtual_pipeline_model_parallel_size
        if vpp:
            micro = s.global_batch_size // (s.micro_batch_size * dp)
            check(micro % p.pipeline_model_parallel_size == 0, "schedule.global_batch_size",
                  f"the interleaved pipeline needs microbatches per step ({micro}) divisible by "
                  f"pipeline_model_parallel_size ({p.pipeline_model_parallel_size})")

    @property
    def format(self) -> ForesightFormat:
        return get_format(self.foresight_format)

    def padded_vocab_size(self, tokenizer_vocab_size: int) -> int:
        vocab = self.model.vocab_size or tokenizer_vocab_size
        if vocab < tokenizer_vocab_size:
            raise ConfigError("model.vocab_size", f"({vocab}) is smaller than the tokenizer's "
                                                  f"vocabulary ({tokenizer_vocab_size})")
        multiple = self.model.make_vocab_size_divisible_by
        return math.ceil(vocab / multiple) * multiple

    def to_dict(self) -> dict:
        out = to_dict(self)
        if self.stage_config is not None:
            out[self.stage] = to_dict(self.stage_config)
        return out


def _apply_preset(tree: dict, origins: dict) -> dict:
    model = tree.get("model")
    if not isinstance(model, dict) or model.get("preset") is None:
        return tree
    name = model["preset"]
    if name not in PRESETS:
        import difflib
        close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError("model.preset", f"unknown preset {name!r}{hint}; choose one of "
                                          f"{', '.join(sorted(PRESETS))}", origins.get("model.preset"))
    return {**tree, "model": {**PRESETS[name], **model}}


def load_recipe(path: str | Path, overrides: list[str] = (), stage_sections: dict | None = None,
                ) -> RecipeConfig:
    """Load, override and validate a recipe file. `stage_sections` maps a stage name to its
    config class; by default the stage's plugin supplies it."""
    path = Path(path)
    tree, origins = load_yaml(path)
    name = f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem
    return recipe_from_tree(tree, overrides, origins, stage_sections, name)


def recipe_from_tree(tree: dict, overrides: list[str] = (), origins: dict | None = None,
                     stage_sections: dict | None = None, name: str = "recipe") -> RecipeConfig:
    """Validate a recipe given as a dict (a file's contents, or the config a checkpoint
    recorded), with `section.key=value` overrides."""
    origins = dict(origins or {})
    tree = apply_overrides(tree, origins, list(overrides))
    tree = _apply_preset(tree, origins)
    _import_extensions(tree, origins)
    stage = tree.get("stage", RecipeConfig.stage)
    if stage_sections is None:
        from megatron_foresight.training.plugin import load_plugin
        try:
            stage_sections = {stage: load_plugin(stage).Config}
        except ConfigError as e:
            raise e.located(origins.get("stage")) from None
    stage_cls = stage_sections.get(stage)
    stage_tree = tree.pop(stage, {}) if stage_cls else {}
    cfg = build(RecipeConfig, tree, origins)
    if stage_cls is not None:
        cfg.stage_config = build(stage_cls, stage_tree, origins, stage)
        if isinstance(cfg.stage_config, StageConfig):
            try:
                cfg.stage_config.check_recipe(cfg)
            except ConfigError as e:
                raise ConfigError(e.key, e.message,
                                  e.where or nearest_origin(origins, e.key)) from None
    cfg.name = name
    return cfg


def _import_extensions(tree: dict, origins: dict) -> None:
    """The modules of `extensions` register what the recipe names before it is built."""
    modules = tree.get("extensions") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError("extensions", f"expected a list of module names, got {modules!r}",
                          origins.get("extensions"))
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError("extensions", f"cannot import {module!r} ({e}); it must be "
                                            "importable from the working directory or PYTHONPATH",
                              origins.get("extensions")) from None


def describe_recipe(stage_sections: dict | None = None) -> str:
    return "\n".join(describe(RecipeConfig, extra_sections=stage_sections))


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "StageConfig", "TaskSetConfig", "LaunchConfig", "LoggingConfig", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "RecipeConfig", "ScheduleConfig", "TokenizerConfig",
    "describe_recipe", "load_recipe", "recipe_from_tree",
]
