"""Builds Megatron-Core `GPTModel`s from a recipe: the Transformer Engine layer spec on CUDA
(FP8 through TE's recipes when asked), Megatron-Core's local spec on the CPU.

The initial weights do not depend on the parallel layout when they are initialized on the CPU
(the default without CUDA): Megatron then draws each weight full-size from the CPU generator and
keeps this rank's shard, which makes tensor parallelism layout-free; and `SeededTransformerLayer`
reseeds that generator from (seed, global layer number) before building each layer, which makes
pipeline parallelism layout-free, since a pipeline stage no longer depends on how many layers the
stages before it drew. So TP=2 or PP=2 starts from exactly the model TP=1/PP=1 starts from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_foresight.config import ConfigError, RecipeConfig
from megatron_foresight.models import rope, swiglu

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def use_transformer_engine(cfg: RecipeConfig) -> bool:
    """Whether to build Transformer Engine layers; raises a ConfigError when the recipe asks for
    something this machine cannot run."""
    impl, cuda = cfg.model.transformer_impl, torch.cuda.is_available()
    if not cuda and cfg.model.fp8:
        raise ConfigError("model.fp8", f"FP8 ({cfg.model.fp8!r}) needs a CUDA GPU with Transformer "
                                       "Engine; this machine has no CUDA. Set model.fp8=null for "
                                       "the CPU path.")
    if impl == "local" or not cuda:
        _check_local_path(cfg, impl)
    if impl == "local":
        return False
    if not cuda:
        if impl == "transformer_engine":
            raise ConfigError("model.transformer_impl", "transformer_engine needs a CUDA GPU; "
                                                        "use local (or auto) on this machine")
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        if impl == "transformer_engine" or cfg.model.fp8:
            raise ConfigError("model.transformer_impl", f"Transformer Engine does not import "
                              f"({e}); install the [gpu] extra or use the NGC container") from None
        log.warning("Transformer Engine is not installed: using Megatron-Core's local layers "
                    "(slower; no FP8). Install the [gpu] extra or use the NGC PyTorch container.")
        return False
    return True


def document_format(cfg: RecipeConfig) -> str | None:
    """How training samples keep each token's attention inside its document
    (data.document_masks): None (off), "mask" (a [seq, seq] mask: the local layers) or
    "starts" (packed-sequence boundaries: Transformer Engine). Asked by the stages that read
    packed samples (not FC-RL, whose batches are single episodes)."""
    if not cfg.data.document_masks:
        return None
    if not use_transformer_engine(cfg):
        return "mask"
    _check_packed_sequences(cfg)
    return "starts"


def _check_packed_sequences(cfg: RecipeConfig) -> None:
    """Transformer Engine reads THD causal attention as per-document ("padding_causal") from
    1.7 on."""
    from megatron.core.utils import is_te_min_version

    if not is_te_min_version("1.7.0"):
        raise ConfigError("data.document_masks", "per-document attention on Transformer Engine "
                          "needs transformer-engine >= 1.7 (packed sequences): upgrade it, or "
                          "set data.document_masks=false")


@functools.cache
def _cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX); None if unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _check_local_path(cfg: RecipeConfig, impl: str) -> None:
    if not torch.cuda.is_available() and cfg.model.precision != "fp32" \
            and _cpu_has_bf16() is False:
        log.warning("model.precision=%s on a CPU without AVX-512 BF16 or AMX: half-precision "
                    "matmuls are emulated there and slower than fp32; set model.precision=fp32",
                    cfg.model.precision)
    if cfg.parallel.sequence_parallel:
        try:
            import apex  # noqa: F401  (Apex's fused norms support sequence parallelism)
        except ImportError:
            raise ConfigError("parallel.sequence_parallel", "needs Transformer Engine (or Apex) "
                              "layers; Megatron-Core's local layers use torch norms, which do not "
                              "support it. Set it to false on this machine.") from None


def fp8_settings(m) -> dict:
    """The TransformerConfig fields of the recipe's FP8 choice: Transformer Engine's delayed
    scaling (per-tensor scales from an amax history), hybrid = E4M3 forward, E5M2 gradients."""
    if not m.fp8:
        return {}
    return dict(fp8=m.fp8, fp8_recipe="delayed", fp8_amax_history_len=m.fp8_amax_history_len,
                fp8_amax_compute_algo=m.fp8_amax_compute_algo)


@functools.cache
def grad_accum_fusion_available() -> bool:
    """Whether Apex's `fused_weight_gradient_mlp_cuda` kernel is importable: the output layer
    is Megatron's own `ColumnParallelLinear` even under the TE spec, and it refuses to build
    with `gradient_accumulation_fusion` without that kernel (NVIDIA's containers ship Apex; a
    pip install of transformer-engine alone does not). Not run on a GPU here."""
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def transformer_config(cfg: RecipeConfig, use_te: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p = cfg.model, cfg.parallel
    dtype = _DTYPES[m.precision]
    cuda = torch.cuda.is_available()
    fp8 = fp8_settings(m)
    recompute = {}
    if m.recompute_granularity:
        recompute = dict(recompute_granularity=m.recompute_granularity)
        if m.recompute_granularity == "full":
            recompute.update(recompute_method="uniform", recompute_num_layers=m.recompute_num_layers)
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.query_groups,
        kv_channels=m.kv_channels, normalization=m.normalization, layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False, add_qkv_bias=m.add_qkv_bias,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        bf16=m.precision == "bf16", fp16=m.precision == "fp16", params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        use_cpu_initialization=m.init_on_cpu if m.init_on_cpu is not None else not cuda,
        # The fused kernels need CUDA (and TE or Apex for some); the local CPU path runs the
        # plain torch versions of the same math.
        # SwiGLU takes the fused call on the local path too, where `models.swiglu` serves it.
        # GeLU only has a bias-GeLU fusion, and these models have no bias (Megatron refuses it)
        bias_activation_fusion=m.activation == "swiglu",
        bias_dropout_fusion=use_te, masked_softmax_fusion=use_te,
        apply_rope_fusion=use_te, persist_layer_norm=use_te,
        gradient_accumulation_fusion=use_te and grad_accum_fusion_available(),
        # Loss is summed per token and divided by the global token count once per step, so the
        # result does not depend on how the batch is split into microbatches or DP ranks.
        calculate_per_token_loss=True,
        # With an interleaved pipeline over 2 stages, each rank's previous and next stage are the
        # same peer, so a batched isend/irecv carries an activation and a gradient of the same
        # shape between the same two ranks, and they can be matched the wrong way round
        # (measured on gloo: wrong losses from the 3rd microbatch on; Megatron-LM issue #750).
        # Unbatched p2p puts the two directions on different communicators.
        batch_p2p_comm=not (p.virtual_pipeline_model_parallel_size
                            and p.pipeline_model_parallel_size == 2),
        **fp8, **recompute,
    )


def layer_spec(cfg: RecipeConfig, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from megatron_foresight.inference.slots import SlotSelfAttention
    from megatron_foresight.models.attention import SDPADotProductAttention

    if use_te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = specs.get_gpt_layer_local_spec(normalization=cfg.model.normalization)
        if cfg.model.local_core_attention == "sdpa":
            spec = _with_core_attention(spec, SDPADotProductAttention)
    # Megatron's SelfAttention unless the inference context is a slot KV cache (continuous
    # batching); same weights and keys. With the Transformer Engine spec this was not run on a
    # GPU yet (its core attention is bypassed on that path, its linear layers are used as is).
    spec = _with_self_attention(spec, SlotSelfAttention)
    return dataclasses.replace(spec, module=_seeded_layer_class(),
                               params={**spec.params, "init_seed": cfg.seed})


def _with_core_attention(spec, core_attention):
    attention = spec.submodules.self_attention
    submodules = dataclasses.replace(attention.submodules, core_attention=core_attention)
    layer = dataclasses.replace(spec.submodules,
                                self_attention=dataclasses.replace(attention, submodules=submodules))
    return dataclasses.replace(spec, submodules=layer)


def _with_self_attention(spec, module):
    layer = dataclasses.replace(spec.submodules, self_attention=dataclasses.replace(
        spec.submodules.self_attention, module=module))
    return dataclasses.replace(spec, submodules=layer)


_SEEDED_LAYER = None


def _seeded_layer_class():
    global _SEEDED_LAYER
    if _SEEDED_LAYER is not None:
        return _SEEDED_LAYER
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer, get_transformer_layer_offset,
    )

    class SeededTransformerLayer(TransformerLayer):
        """A TransformerLayer whose weights are drawn from a generator seeded by (seed, global
        layer number), so they are the same whichever pipeline stage builds the layer."""

        def __init__(self, config, submodules, layer_number=1, *, init_seed: int, **kwargs):
            offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"),
                                                  ps.get_pipeline_model_parallel_rank())
            torch.manual_seed(init_seed * 1_000_003 + layer_number + offset)
            super().__init__(config, submodules, layer_number, **kwargs)

    _SEEDED_LAYER = SeededTransformerLayer
    return _SEEDED_LAYER


def build_model(cfg: RecipeConfig, padded_vocab_size: int, pg_collection=None,
                initialize: bool = True) -> list:
    """One GPTModel per virtual pipeline chunk on this rank (one without an interleaved pipeline),
    on this process's device, wrapped for bf16/fp16; the caller's RNG state is left as found.
    `initialize=False` skips drawing random weights (for models about to be filled)."""
    use_te = use_transformer_engine(cfg)
    config = transformer_config(cfg, use_te)
    rope.install()  # RoPE's cos/sin computed once per table on the unfused path
    if not use_te:
        swiglu.install()  # SwiGLU's backward without a concatenation
    if not initialize:
        config = dataclasses.replace(config, perform_initialization=False)
    spec = layer_spec(cfg, use_te)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # layers reseed the generator while building
        chunks = [_build_chunk(cfg, config, spec, padded_vocab_size, vp if vpp else None,
                               pg_collection) for vp in range(vpp or 1)]
    m = cfg.model
    log.info("model: %s, %d layers, hidden %d, %s layers, %.2fM parameters on this rank",
             m.preset or m.family, m.num_layers, m.hidden_size,
             "Transformer Engine" if use_te else "local",
             sum(p.numel() for c in chunks for p in c.parameters()) / 1e6)
    return chunks


def _build_chunk(cfg: RecipeConfig, config, spec, padded_vocab_size: int, vp_stage, pg_collection):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    m = cfg.model
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=padded_vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base,
        rope_scaling=m.rope_scaling, rope_scaling_factor=m.rope_scaling_factor,
        vp_stage=vp_stage, pg_collection=pg_collection,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.fp16 or config.bf16:
        model = Float16Module(config, model)
    return model


def mask_padded_vocab(model, vocab_size: int) -> None:
    """Give the padded vocabulary rows (ids past the tokenizer's `vocab_size`, which exist only
    because the embedding is padded to a multiple of make_vocab_size_divisible_by) a logit of
    -inf, in training and scoring as in sampling (`inference.generate` never draws them). Then
    the log-probabilities the trainer recomputes are those of the distribution the sampler drew
    from. A forward hook on the last stage's output layer, which sees either this rank's
    vocabulary shard or, with runtime_gather_output, all of it."""
    inner = getattr(model, "module", model)
    layer = getattr(inner, "output_layer", None)
    if layer is None or vocab_size >= layer.output_size:
        return
    full, local = layer.output_size, layer.output_size_per_partition

    def hook(_module, _inputs, output):
        from megatron.core import parallel_state as ps

        logits, bias = output
        width = logits.shape[-1]
        start = 0 if width == full else ps.get_tensor_model_parallel_rank() * local
        padded = torch.arange(start, start + width, device=logits.device) >= vocab_size
        return logits.masked_fill(padded, float("-inf")), bias

    layer.register_forward_hook(hook)


class LogitTemperature:
    """Divides the logits of `model`'s output layer (the last pipeline stage's; a model without
    one is left alone) by `temperature` while `on`: the model then scores, and trains, the
    distribution a sampler at that temperature draws from. A forward hook like
    `mask_padded_vocab`'s (-inf stays -inf), giving float32 logits as the sampler divides
    them. Sampling divides by the temperature itself, so rollouts run inside `off()`; the
    fused decode step reads the weights, not the layer, but a prefill goes through it."""

    def __init__(self, model, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.on = float(temperature), True
        inner = model
        while hasattr(inner, "module"):
            inner = inner.module
        layer = getattr(inner, "output_layer", None)
        self.handle = None if layer is None else layer.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        if not self.on or self.temperature == 1.0:
            return None
        logits, bias = output  # in float32, as the sampler divides them (bf16 would round)
        return (logits.float() / self.temperature,
                None if bias is None else bias.float() / self.temperature)

    @contextlib.contextmanager
    def off(self):
        """The plain logits inside (sampling, greedy validation); the previous state after."""
        before, self.on = self.on, False
        try:
            yield
        finally:
            self.on = before
