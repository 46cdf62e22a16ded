"""Hugging Face `config.json` <-> the recipe's `model` section, for the Llama and Qwen2 families.

Reading accepts both spellings of the RoPE settings (`rope_theta` + `rope_scaling` as written by
transformers 4.x and most published checkpoints; `rope_parameters` as written by 5.x). Writing
uses the 4.x spelling, which every transformers version still reads. Anything Megatron-Core's
GPTModel cannot reproduce exactly is refused with the field that says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_foresight.config import ModelConfig
from megatron_foresight.errors import UsageError

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Megatron-Core applies Llama-3.1 RoPE scaling with these constants fixed.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise UsageError(f"{hf_dir}: no config.json; --hf-dir must be a Hugging Face model "
                         "directory (config.json + *.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def model_fields_from_hf(hf: dict, where: str = "config.json") -> dict:
    """The recipe's model section for a Hugging Face config; refuses what cannot convert exactly."""

    def refuse(field: str, why: str):
        raise UsageError(f"{where}: {field}: {why}")

    family = hf.get("model_type")
    if family not in FAMILIES:
        refuse("model_type", f"{family!r} is not supported; convertible families: "
                             f"{', '.join(FAMILIES)} (architectures {', '.join(FAMILIES.values())})")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            refuse(field, f"must be a positive integer, got {hf.get(field)!r}")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"{hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", "MLP biases are not supported")
    if family == "llama" and hf.get("attention_bias"):
        refuse("attention_bias", "Llama attention_bias also puts a bias on o_proj, which "
                                 "Megatron's layers do not have")
    if family == "qwen2" and hf.get("use_sliding_window"):
        refuse("use_sliding_window", "sliding-window attention is not supported")
    if hf.get("pretraining_tp", 1) != 1:
        refuse("pretraining_tp", "must be 1")

    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    if hf.get("head_dim") is None and hidden % heads:
        refuse("hidden_size", f"({hidden}) is not divisible by num_attention_heads ({heads}) "
                              "and head_dim is not given")
    theta, scaling = _rope(hf, refuse)
    fields = dict(
        family=family,
        num_layers=hf["num_hidden_layers"], hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim if head_dim * heads != hidden else None,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        normalization="RMSNorm", norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        activation="swiglu", add_qkv_bias=family == "qwen2", position_embedding_type="rope",
        rotary_base=theta, rope_scaling=scaling is not None,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        precision=_DTYPES.get(hf.get("torch_dtype") or hf.get("dtype") or "float32", "fp32"),
    )
    if scaling is not None:
        fields["rope_scaling_factor"] = scaling
    return fields


def _rope(hf: dict, refuse) -> tuple[int, float | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        prefix, scaling = "rope_parameters", params
        theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    else:
        prefix, scaling = "rope_scaling", hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta", 10_000.0)
    if float(theta) != int(theta):
        refuse(f"{prefix}.rope_theta", f"({theta}) must be a whole number")
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return int(theta), None
    if kind != "llama3":
        refuse(f"{prefix}.rope_type", f"{kind!r} is not supported (default or llama3)")
    for key, value in _LLAMA3_FIXED.items():
        if float(scaling.get(key, value)) != value:
            refuse(f"{prefix}.{key}", f"({scaling[key]}) must be {value}: Megatron-Core's llama3 "
                                      "RoPE scaling has it fixed")
    return int(theta), float(scaling.get("factor", 8.0))


def hf_config_from_model(m: ModelConfig, vocab_size: int, *, dtype: str,
                         bos: int | None, eos: int | None, pad: int | None) -> dict:
    """config.json for a model section; refuses shapes that Llama/Qwen2 in transformers lack."""

    def refuse(field: str, why: str):
        raise UsageError(f"model.{field}: {why}; this model cannot be exported to Hugging Face "
                         f"as {m.family}")

    if m.normalization != "RMSNorm":
        refuse("normalization", f"{m.normalization} (Llama and Qwen2 use RMSNorm)")
    if m.activation != "swiglu":
        refuse("activation", f"{m.activation} (Llama and Qwen2 use swiglu)")
    if m.position_embedding_type != "rope":
        refuse("position_embedding_type", m.position_embedding_type)
    if m.add_qkv_bias != (m.family == "qwen2"):
        refuse("add_qkv_bias", f"{m.add_qkv_bias} (Qwen2 has a QKV bias, Llama has none: "
                               "set model.family to match)")
    head_dim = m.head_dim
    config = {
        "architectures": [FAMILIES[m.family]],
        "model_type": m.family,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.query_groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_scaling": ({"rope_type": "llama3", "factor": m.rope_scaling_factor, **_LLAMA3_FIXED}
                         if m.rope_scaling else None),
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "vocab_size": vocab_size,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "torch_dtype": dtype,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    if m.family == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None,
                      max_window_layers=m.num_layers)
    return config
