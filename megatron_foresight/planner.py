"""The launch planner: checks a recipe's parallel layout against a cluster shape and estimates
per-GPU memory and step FLOPs before anything starts (`foresight plan`).

Everything here is arithmetic on the recipe; nothing imports torch or Megatron, so it runs on a
login node. The estimates follow how this project builds the model (training/loop.py,
models/provider.py) and are meant for choosing a layout, not to the last GiB:

* Parameters per GPU: every matrix is split over tensor-parallel ranks, norms are replicated,
  layers split evenly over pipeline stages; the embedding sits on the first stage and the output
  layer (or, with tied embeddings and PP > 1, a copy of the embedding) on the last.
* Weights take 2 bytes (bf16 / fp16) or 4 (fp32) per parameter. FP8 runs keep the bf16 weights
  and Transformer Engine also caches an FP8 copy of each layer matrix and of its transpose: 2
  more bytes per matrix parameter (the embedding and output layer stay bf16).
* Gradients: Megatron's DDP accumulates and reduces them in fp32 (`grad_reduce_in_fp32`),
  4 bytes per parameter, full size even with the distributed optimizer.
* Optimizer state: Adam moments (8 bytes) plus fp32 master weights for bf16 / fp16 models
  (4 bytes); SGD: momentum (4) plus master weights. The distributed optimizer divides the state
  by the data-parallel size.
* Activations per layer and token (16-bit activations; twice that for fp32), following
  Korthikanti et al. 2022 with the Llama block (no dropout masks when dropout is 0):
  - saved inputs of the two norms, the QKV projection and the first MLP projection: 8h bytes,
    divided by TP only with sequence parallelism;
  - queries, keys, values and the attention output: 2*a*d + 4*g*d + 2*a*d bytes, and the MLP's
    hidden activations: 6f bytes with SwiGLU (gate and up 4f, their product 2f; 4f with GeLU),
    all divided by TP;
  - with the unfused core attention (the local layers' `megatron` core attention): the score
    and softmax matrices, 4*a*s bytes, divided by TP; selective recomputation drops them, fused
    attention (Transformer Engine, torch SDPA) never stores them;
  - full recomputation stores only each chunk's input (2h bytes per layer / recompute_num_layers,
    divided by TP with sequence parallelism) plus one chunk's full activations while it is
    recomputed.
  The first pipeline stage holds the most microbatches in flight: with 1F1B, stage r holds
  min(microbatches, PP - r); interleaved, 2(PP - r - 1) + (VPP - 1) PP + 1 model chunks (the
  Megatron-LM schedule's warm-up plus one). Context parallelism divides the sequence.
  The last stage adds the fp32 logits of one microbatch (4 bytes x s x b x vocab / TP).
* FC-RL adds the frozen reference model's weights (when `fc_rl.kl_coef` > 0) and the rollout's
  KV cache: keys and values of every local layer for (prompts_per_step x group_size) sequences of
  data.seq_length tokens.
* A fixed allowance (`--overhead-gib`, default 5) for the CUDA context, NCCL buffers and
  allocator fragmentation.
* FLOPs per step: 2 FLOPs per multiply-add; per token the forward pass costs 2 x (matrix
  parameters) plus 4 x s x a x d per layer for attention (the full s x s product, as Megatron-LM's
  MFU count); training is 3 forward passes' worth (forward, backward for inputs and for weights),
  and full recomputation adds one forward pass to the hardware FLOPs. FC-RL adds generating
  the rollouts (one forward pass per token) and recomputing log-probabilities (one forward pass
  of the policy, one of the reference when it is used).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from megatron_foresight.config import ConfigError, RecipeConfig
from megatron_foresight.training.plugin import load_plugin

GIB = 1 << 30
H100_BF16_DENSE_TFLOPS = 989.0


@dataclass
class ParamCounts:
    """Parameter counts of the whole model, by part."""

    embedding: int
    output_layer: int
    per_layer_matrices: int
    per_layer_replicated: int
    final_norm: int
    layers: int

    @property
    def total(self) -> int:
        return (self.embedding + self.output_layer + self.final_norm
                + self.layers * (self.per_layer_matrices + self.per_layer_replicated))

    @property
    def matmul_per_token(self) -> int:
        """Parameters each token multiplies through (the forward pass's 2N FLOPs per token)."""
        return self.layers * self.per_layer_matrices + self.embedding


@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""

    stage: int
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    reference_model: int = 0
    kv_cache: int = 0
    overhead: int = 0
    fp8_weights: int = 0
    optimizer_other: int = 0
    """The optimizer state with the other choice of parallel.use_distributed_optimizer (not in
    the total)."""

    @property
    def total(self) -> int:
        return (self.weights + self.fp8_weights + self.gradients + self.optimizer
                + self.activations + self.logits + self.reference_model + self.kv_cache
                + self.overhead)


@dataclass
class Plan:
    recipe: str
    stage_name: str
    nodes: int
    gpus_per_node: int
    world_size: int
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    microbatches: int
    padded_vocab: int
    parameters: int
    memory: StageMemory
    gpu_memory: int
    model_flops_per_step: float
    hardware_flops_per_step: float
    tokens_per_step: int
    distributed_optimizer: bool = False
    precision: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "memory"}
        out["memory_bytes"] = {**asdict(self.memory), "total": self.memory.total}
        out["fits"] = self.fits
        return out


def describe_precision(cfg: RecipeConfig) -> str:
    """The recipe's numerics and layer implementation, as the cluster will run them."""
    m = cfg.model
    layers = {"auto": "Transformer Engine layers on CUDA (local layers without it)",
              "transformer_engine": "Transformer Engine layers (CUDA only)",
              "local": "Megatron-Core local layers"}[m.transformer_impl]
    text = f"{'auto (bf16 on CUDA)' if m.precision == 'auto' else m.precision}, {layers}"
    if m.fp8:
        text += (f"; FP8 {m.fp8} (delayed scaling, amax history {m.fp8_amax_history_len}, "
                 f"{m.fp8_amax_compute_algo}; CUDA + Transformer Engine only)")
    if m.recompute_granularity:
        text += f"; {m.recompute_granularity} activation recomputation"
    return text


def count_parameters(cfg: RecipeConfig, padded_vocab: int) -> ParamCounts:
    m = cfg.model
    h, a, g, f = m.hidden_size, m.num_attention_heads, m.query_groups, m.ffn_hidden_size
    d = m.head_dim
    attention = h * a * d + 2 * h * g * d + a * d * h
    if m.add_qkv_bias:
        attention += a * d + 2 * g * d
    mlp = (3 if m.activation == "swiglu" else 2) * h * f
    norm = (2 if m.normalization == "LayerNorm" else 1) * h
    tied = not m.untie_embeddings_and_output_weights
    embedding = padded_vocab * h if m.position_embedding_type == "rope" else \
        (padded_vocab + m.max_position_embeddings) * h
    return ParamCounts(embedding=embedding, output_layer=0 if tied else padded_vocab * h,
                       per_layer_matrices=attention + mlp, per_layer_replicated=2 * norm,
                       final_norm=norm, layers=m.num_layers)


def _stage_parameters(cfg: RecipeConfig, counts: ParamCounts, padded_vocab: int,
                      stage: int) -> int:
    """Parameters one GPU of pipeline stage `stage` holds."""
    p, m = cfg.parallel, cfg.model
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    layers = m.num_layers // pp
    n = layers * (counts.per_layer_matrices // tp + counts.per_layer_replicated)
    if stage == 0:
        n += counts.embedding // tp
    if stage == pp - 1:
        n += counts.final_norm
        if counts.output_layer:
            n += counts.output_layer // tp
        elif pp > 1:  # tied: the last stage keeps its own copy of the embedding for the output
            n += padded_vocab * m.hidden_size // tp
    return n


def activation_bytes_per_layer_token(cfg: RecipeConfig) -> dict[str, float]:
    """Bytes of saved activations per layer and token, split into what TP divides always,
    what it divides only with sequence parallelism, and the unfused attention matrices."""
    m, p = cfg.model, cfg.parallel
    h, a, g, f = m.hidden_size, m.num_attention_heads, m.query_groups, m.ffn_hidden_size
    d = m.head_dim
    scale = _activation_scale(m)
    seq = cfg.data.seq_length // p.context_parallel_size
    norms_and_inputs = 8 * h
    sharded = 2 * a * d + 4 * g * d + 2 * a * d + (6 if m.activation == "swiglu" else 4) * f
    unfused = m.transformer_impl == "local" and m.local_core_attention == "megatron"
    scores = 4 * a * seq if unfused and m.recompute_granularity != "selective" else 0
    # 1-byte dropout masks: after attention and after the MLP (split like the layer input), and
    # on the attention probabilities (split over heads, like the scores)
    hidden_dropout = 2 * h if m.hidden_dropout > 0 else 0
    attention_dropout = a * seq if m.attention_dropout > 0 and scores else 0
    return {"sequence_parallel_only": scale * (norms_and_inputs + hidden_dropout),
            "tensor_parallel": scale * (sharded + scores + attention_dropout)}


def _activation_scale(m) -> int:
    """The activation formulas count 2-byte (bf16 / fp16) values; fp32 doubles them."""
    return 2 if m.precision == "fp32" else 1


def _in_flight(cfg: RecipeConfig, microbatches: int, stage: int) -> tuple[int, int]:
    """(model chunks in flight on `stage`, layers per chunk) at the peak of the schedule."""
    p, m = cfg.parallel, cfg.model
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1
    if vpp == 1:
        return min(microbatches, pp - stage), m.num_layers // pp
    chunks = 2 * (pp - stage - 1) + (vpp - 1) * pp + 1
    return min(microbatches * vpp, chunks), m.num_layers // (pp * vpp)


def _activations(cfg: RecipeConfig, microbatches: int, stage: int) -> int:
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    tokens = cfg.schedule.micro_batch_size * cfg.data.seq_length // p.context_parallel_size
    parts = activation_bytes_per_layer_token(cfg)
    sp_div = tp if p.sequence_parallel else 1
    full_layer = parts["sequence_parallel_only"] / sp_div + parts["tensor_parallel"] / tp
    chunks, layers_per_chunk = _in_flight(cfg, microbatches, stage)
    if m.recompute_granularity == "full":
        n = m.recompute_num_layers
        # each recompute chunk keeps its input
        stored = 2 * m.hidden_size * _activation_scale(m) / sp_div / n
        working = min(n, layers_per_chunk) * full_layer  # one chunk recomputed during backward
        per_token = chunks * layers_per_chunk * stored + working
    else:
        per_token = chunks * layers_per_chunk * full_layer
    return int(per_token * tokens)


def plan(cfg: RecipeConfig, nodes: int, gpus_per_node: int, gpu_memory_gib: float = 80.0,
         overhead_gib: float = 5.0, vocab_size: int | None = None) -> Plan:
    """Check `cfg` against nodes x gpus_per_node processes and estimate its memory and FLOPs.
    Raises ConfigError naming the failing divisibility or memory limit."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError("plan", f"--nodes ({nodes}) and --gpus-per-node ({gpus_per_node}) "
                                  "must be at least 1")
    world = nodes * gpus_per_node
    cfg.check_world_size(world)
    p, m, s = cfg.parallel, cfg.model, cfg.schedule
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, \
        p.context_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    dp = world // (tp * pp * cp)
    notes = []
    if tp > gpus_per_node:
        notes.append(f"tensor_model_parallel_size ({tp}) spans nodes (--gpus-per-node "
                     f"{gpus_per_node}): every layer's all-reduce would leave NVLink")
    padded = cfg.padded_vocab_size(vocab_size or cfg.model.vocab_size or _tokenizer_vocab(cfg))
    counts = count_parameters(cfg, padded)
    microbatches = s.global_batch_size // (s.micro_batch_size * dp)
    half = m.precision != "fp32"
    stage_cls = load_plugin(cfg.stage)
    stages = []
    for stage in range(pp):
        n = _stage_parameters(cfg, counts, padded, stage)
        weight_bytes = n * (2 if half else 4)
        opt_per_param = {"adam": 8, "sgd": 4}[cfg.optimizer.type] + (4 if half else 0)
        replicated, sharded = n * opt_per_param, math.ceil(n * opt_per_param / dp)
        optimizer, other = (sharded, replicated) if p.use_distributed_optimizer \
            else (replicated, sharded)
        logits = 0
        if stage == pp - 1:
            logits = 4 * s.micro_batch_size * (cfg.data.seq_length // cp) * padded // tp
        mem = StageMemory(stage=stage, parameters=n, weights=weight_bytes, gradients=4 * n,
                          optimizer=optimizer, activations=_activations(cfg, microbatches, stage),
                          logits=logits, overhead=int(overhead_gib * GIB), optimizer_other=other)
        if m.fp8:
            mem.fp8_weights = 2 * (m.num_layers // pp) * (counts.per_layer_matrices // tp)
        extra = stage_cls.plan_memory(cfg, weight_bytes, m.num_layers // pp, half)
        mem.reference_model, mem.kv_cache = extra.reference_model, extra.kv_cache
        stages.append(mem)
    worst = max(stages, key=lambda x: x.total)
    model_flops, hardware_flops, tokens = step_flops(cfg, counts, dp)
    result = Plan(recipe=cfg.name, stage_name=cfg.stage, nodes=nodes, gpus_per_node=gpus_per_node,
                  world_size=world, tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp,
                  microbatches=microbatches, padded_vocab=padded, parameters=counts.total,
                  memory=worst, gpu_memory=int(gpu_memory_gib * GIB),
                  model_flops_per_step=model_flops, hardware_flops_per_step=hardware_flops,
                  tokens_per_step=tokens, distributed_optimizer=p.use_distributed_optimizer,
                  precision=describe_precision(cfg), notes=notes)
    if not result.fits:
        parts = _memory_rows(worst)
        biggest = max(parts[:-1], key=lambda kv: kv[1])
        raise ConfigError("memory", f"pipeline stage {worst.stage} needs "
                          f"{worst.total / GIB:.1f} GiB per GPU, more than the "
                          f"{gpu_memory_gib:g} GiB of one GPU (largest part: {biggest[0]} "
                          f"{biggest[1] / GIB:.1f} GiB). Raise TP/PP, turn on "
                          f"parallel.use_distributed_optimizer or activation recomputation, "
                          f"or lower micro_batch_size.\n{format_plan(result)}")
    return result


def step_flops(cfg: RecipeConfig, counts: ParamCounts, dp: int) -> tuple[float, float, int]:
    """(model FLOPs, hardware FLOPs, tokens) of one optimizer step; for FC-RL, of one rollout
    step (generation, log-prob recomputation and `epochs` passes of training)."""
    m = cfg.model
    d = m.head_dim
    seq = cfg.data.seq_length
    forward_per_token = (2 * counts.matmul_per_token
                         + 4 * seq * m.num_attention_heads * d * m.num_layers)
    tokens, train_passes, extra_passes = load_plugin(cfg.stage).plan_step(cfg, dp)
    model = forward_per_token * tokens * (3 * train_passes + extra_passes)
    recompute = forward_per_token * tokens * train_passes if m.recompute_granularity == "full" \
        else 0
    return float(model), float(model + recompute), tokens


def _tokenizer_vocab(cfg: RecipeConfig) -> int:
    """The tokenizer's vocabulary when model.vocab_size is null: read from the tokenizer file,
    or, for a built-in world not built yet, the size the world builder asks sentencepiece for
    (an upper bound: the built world's tokenizer may come out smaller)."""
    tok = cfg.data.tokenizer_config()
    if tok.type == "byte":
        from megatron_foresight.data.tokenizer import ByteTokenizer

        return ByteTokenizer().vocab_size
    from pathlib import Path

    if tok.path and Path(tok.path).exists():
        from megatron_foresight.data.tokenizer import build_tokenizer

        return build_tokenizer(tok).vocab_size
    if tok.type == "sentencepiece" and not cfg.data.tokenizer.path and cfg.data.world:
        from megatron_foresight.world.sizes import WorldSizes

        return WorldSizes().vocab_size
    raise ConfigError("model.vocab_size", f"is null and the tokenizer ({tok.path}) is not on "
                                          "this machine: set model.vocab_size or pass "
                                          "--vocab-size")


def _memory_rows(mem: StageMemory) -> list[tuple[str, int]]:
    rows = [("weights", mem.weights)]
    if mem.fp8_weights:
        rows.append(("FP8 weight copies (TE cache)", mem.fp8_weights))
    rows += [("gradients (fp32)", mem.gradients),
            ("optimizer state", mem.optimizer), ("activations", mem.activations),
            ("logits (fp32, last stage)", mem.logits)]
    if mem.reference_model:
        rows.append(("reference model", mem.reference_model))
    if mem.kv_cache:
        rows.append(("rollout KV cache", mem.kv_cache))
    rows.append(("CUDA context, NCCL, fragmentation", mem.overhead))
    rows.append(("total", mem.total))
    return rows


def format_plan(pl: Plan, peak_tflops: float = H100_BF16_DENSE_TFLOPS, mfu: float = 0.4) -> str:
    lines = [
        f"recipe {pl.recipe} (stage {pl.stage_name}) on {pl.nodes} node(s) x "
        f"{pl.gpus_per_node} GPU(s) = {pl.world_size}",
        f"layout: TP {pl.tp} x PP {pl.pp}" + (f" (VPP {pl.vpp})" if pl.vpp > 1 else "")
        + f" x CP {pl.cp} x DP {pl.dp}; {pl.microbatches} microbatch(es) per step per DP rank",
        f"precision: {pl.precision}",
        f"model: {pl.parameters / 1e9:.3f}B parameters (vocabulary padded to {pl.padded_vocab}); "
        f"{pl.memory.parameters / 1e9:.3f}B on one GPU of pipeline stage {pl.memory.stage}",
        f"per-GPU memory (pipeline stage {pl.memory.stage}, the fullest):",
    ]
    for name, value in _memory_rows(pl.memory):
        lines.append(f"  {name:<36} {value / GIB:9.2f} GiB")
        if name == "optimizer state":
            other = "without" if pl.distributed_optimizer else "with"
            lines.append(f"    ({other} the distributed optimizer: "
                         f"{pl.memory.optimizer_other / GIB:.2f} GiB)")
    lines.append(f"  {'fits in':<36} {pl.gpu_memory / GIB:9.2f} GiB: "
                 f"{'yes' if pl.fits else 'NO'} ({100 * pl.memory.total / pl.gpu_memory:.0f}%)")
    per_gpu = pl.hardware_flops_per_step / pl.world_size
    seconds = per_gpu / (peak_tflops * 1e12 * mfu)
    lines += [
        f"FLOPs per step: {pl.model_flops_per_step:.3e} model, {pl.hardware_flops_per_step:.3e} "
        f"with recomputation ({pl.tokens_per_step} tokens); {per_gpu:.3e} per GPU",
        f"step time at {mfu:.0%} of {peak_tflops:g} TFLOP/s per GPU: about {seconds:.3g} s",
    ]
    lines += [f"note: {n}" for n in pl.notes]
    return "\n".join(lines)


def plan_json(pl: Plan) -> str:
    return json.dumps(pl.to_dict(), indent=2)
