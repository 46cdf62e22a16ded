"""`foresight plan`: its figures against hand calculation for known configurations, refusals of
impossible layouts with the limit named, and every recipe in recipes/ passing for its intended
cluster shape."""

from pathlib import Path

import pytest

from megatron_foresight.cli import main
from megatron_foresight.config import ConfigError, load_recipe
from megatron_foresight.planner import GIB, plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml")
                 if p.name not in ("base.yaml", "cluster.yaml"))


def _load(rel: str, *overrides: str):
    return load_recipe(ROOT / rel, list(overrides))


def test_llama3_8b_tp2_matches_hand_calculation():
    # Llama 3 8B: h 4096, 32 heads of 128, 8 KV groups, MLP 14336 (SwiGLU), 32 layers,
    # vocabulary 128256 (already a multiple of 128), untied embeddings.
    cfg = _load("recipes/8b/wm_amt.yaml")
    p = plan(cfg, nodes=2, gpus_per_node=8, gpu_memory_gib=80, overhead_gib=5)
    attention = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096      # q, k and v, o
    mlp = 3 * 4096 * 14336                                         # gate, up, down
    per_layer = attention + mlp + 2 * 4096                         # two RMSNorm weights
    total = 32 * per_layer + 2 * 128256 * 4096 + 4096             # + embedding, output, norm
    assert total == 8_030_261_248 == p.parameters                 # the published 8.03B
    # TP=2: matrices halve, norms are replicated; PP=1 keeps embedding and output here.
    local = 32 * ((attention + mlp) // 2 + 2 * 4096) + 2 * 128256 * 4096 // 2 + 4096
    assert p.memory.parameters == local
    assert (p.tp, p.pp, p.dp, p.microbatches) == (2, 1, 8, 16)
    assert p.memory.weights == 2 * local                          # bf16
    assert p.memory.fp8_weights == 2 * 32 * (attention + mlp) // 2  # TE's FP8 copy + transpose
    assert p.memory.gradients == 4 * local                        # fp32 main grads
    assert p.memory.optimizer == 12 * local // 8                  # Adam + masters over DP 8
    assert p.memory.optimizer_other == 12 * local                 # without distributed optimizer
    # Activations, sequence parallel: every term / TP. Per layer and token (bytes):
    # norm and projection inputs 8h, q 2h, k and v 4*8*128, attention output 2h, MLP 6f.
    per_token_layer = (8 * 4096 + 2 * 4096 + 4 * 1024 + 2 * 4096 + 6 * 14336) // 2
    assert per_token_layer == 69632
    assert p.memory.activations == per_token_layer * 32 * 8192    # one microbatch in flight
    assert p.memory.logits == 4 * 8192 * 128256 // 2
    assert p.memory.overhead == 5 * GIB
    # FLOPs: 2 per weight per token through the layers and the output layer, plus attention
    # 4 s a d per layer; training is 3 forward passes; 128 x 8192 tokens per step.
    forward = 2 * (32 * (attention + mlp) + 128256 * 4096) + 4 * 8192 * 32 * 128 * 32
    assert p.tokens_per_step == 128 * 8192
    assert p.model_flops_per_step == 3 * forward * 128 * 8192
    assert p.hardware_flops_per_step == p.model_flops_per_step   # no full recomputation


def test_llama3_70b_interleaved_pipeline_and_full_recompute_by_hand():
    cfg = _load("recipes/70b/wm_amt.yaml")
    p = plan(cfg, nodes=8, gpus_per_node=8)
    assert p.parameters == 70_553_706_496                         # the published 70.6B
    # Stage 0 of an interleaved 1F1B with PP 4, VPP 5 holds 2(PP-1) + (VPP-1)PP + 1 = 23 model
    # chunks of 80 / 20 = 4 layers: 92 layers' activations, 1.15x the model's 80.
    per_token_layer = (8 * 8192 + 2 * 8192 + 4 * 1024 + 2 * 8192 + 6 * 28672) // 8
    assert p.memory.stage == 0
    assert p.memory.activations == per_token_layer * 92 * 8192
    # FC-RL at 70B: PP 1, full recomputation of single layers: each layer keeps its input
    # (2h / TP bytes per token) and one layer is live again during its backward pass.
    rl = plan(_load("recipes/70b/fc_rl.yaml"), nodes=16, gpus_per_node=8)
    assert rl.memory.activations == (80 * 2 * 8192 // 8 + per_token_layer) * 4096
    # The rollout KV cache: keys and values, 80 layers, 4 x 8 sequences of 4096 tokens, one KV
    # group of 128 per TP rank, bf16.
    assert rl.memory.kv_cache == 2 * 80 * 32 * 4096 * 1 * 128 * 2
    assert rl.memory.reference_model == 0                          # kl_coef 0: no reference
    assert rl.hardware_flops_per_step > rl.model_flops_per_step   # recomputation costs FLOPs


def test_kl_reference_counts_a_second_copy_of_the_weights():
    p = plan(_load("recipes/8b/fc_rl.yaml"), nodes=2, gpus_per_node=8)
    assert p.memory.reference_model == p.memory.weights > 0
    q = plan(_load("recipes/8b/fc_rl.yaml", "fc_rl.kl_coef=0"), nodes=2, gpus_per_node=8)
    assert q.memory.reference_model == 0
    assert p.memory.total - q.memory.total == p.memory.weights


@pytest.mark.parametrize("rel, overrides, nodes, message", [
    ("recipes/70b/wm_amt.yaml", [], 3,
     "world size (24 processes) must be divisible by tensor x pipeline x context parallel size "
     "(8 x 4 x 1 = 32)"),
    ("recipes/8b/wm_amt.yaml", ["schedule.global_batch_size=100", "schedule.micro_batch_size=1"],
     2, "global_batch_size (100) must be a multiple of micro_batch_size (1) x data-parallel "
        "size (8)"),
    ("recipes/70b/wm_amt.yaml", ["schedule.global_batch_size=6"], 8,
     "the interleaved pipeline needs microbatches per step (3) divisible by "
     "pipeline_model_parallel_size (4)"),
    # 70B at TP 8 without PP: 8,820,367,360 parameters per GPU; weights 2x, gradients 4x,
    # optimizer 12x / DP 8, activations 34304 x 80 layers x 8192 tokens, logits 4 x 8192 x
    # 128256 / 8, 5 GiB overhead: 94,528,270,336 bytes; FP8 copies 2 x 80 x 855,638,016 / 8 =
    # 17,112,760,320 more: 111,641,030,656 bytes = 104.0 GiB.
    ("recipes/70b/fe_sft.yaml", ["parallel.pipeline_model_parallel_size=1",
                                 "parallel.virtual_pipeline_model_parallel_size=null"], 8,
     "needs 104.0 GiB per GPU, more than the 80 GiB of one GPU (largest part: gradients (fp32) "
     "32.9 GiB)"),
    # The same without the distributed optimizer: 12 x 8,820,367,360 bytes = 98.6 GiB of state.
    ("recipes/70b/fc_rl.yaml", ["parallel.use_distributed_optimizer=false"], 16,
     "largest part: optimizer state 98.6 GiB"),
    ("recipes/8b/fc_rl.yaml", ["parallel.pipeline_model_parallel_size=2",
                               "parallel.virtual_pipeline_model_parallel_size=2"], 2,
     "FC-RL rollouts run one model chunk per pipeline stage"),
    ("recipes/8b/fc_rl.yaml", ["model.fp8=hybrid"], 2, "set model.fp8: null for this stage"),
    ("recipes/8b/fc_rl.yaml", ["fc_rl.prompts_per_step=3", "fc_rl.group_size=7"], 2,
     "each rank's 21 episodes per step (fc_rl.prompts_per_step x group_size) must be a "
     "multiple of 2"),
    ("recipes/8b/fc_rl.yaml", ["fc_rl.algorithm=ppo"], 2,
     "set sequence_parallel: false with fc_rl.algorithm.type: ppo"),
])
def test_impossible_layouts_are_refused_naming_the_limit(rel, overrides, nodes, message):
    with pytest.raises(ConfigError) as e:
        plan(_load(rel, *overrides), nodes=nodes, gpus_per_node=8)
    assert message in str(e.value)


def test_shape_divisibility_is_refused_when_the_recipe_loads():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(32\) must be divisible by "
                                          r"tensor_model_parallel_size \(3\)"):
        _load("recipes/8b/wm_amt.yaml", "parallel.tensor_model_parallel_size=3")


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_recipe_passes_the_planner_for_its_cluster(recipe):
    cfg = load_recipe(recipe)
    launch = cfg.launch
    p = plan(cfg, launch.nodes, launch.gpus_per_node, launch.gpu_memory_gib, launch.overhead_gib)
    assert p.fits and p.world_size == launch.nodes * launch.gpus_per_node
    # the CPU recipes run fp32 and auto (bf16 where the CPU runs it faster); the clusters bf16
    if not recipe.parent.name.startswith(("tiny-cpu", "smollm2-135m")):
        assert cfg.model.precision == "bf16" and p.tp <= launch.gpus_per_node


def test_plan_command_prints_the_table_and_fails_with_status_2(capsys):
    assert main(["plan", str(ROOT / "recipes/70b/wm_amt.yaml")]) == 0
    out = capsys.readouterr().out
    assert "8 node(s) x 8 GPU(s) = 64" in out and "TP 8 x PP 4 (VPP 5) x CP 1 x DP 2" in out
    assert "(without the distributed optimizer: 25.38 GiB)" in out
    assert ("precision: bf16, Transformer Engine layers on CUDA (local layers without it); "
            "FP8 hybrid (delayed scaling, amax history 1024, max; CUDA + Transformer Engine "
            "only)") in out
    assert main(["plan", str(ROOT / "recipes/70b/wm_amt.yaml"), "--nodes", "3"]) == 2
    assert "must be divisible by tensor x pipeline" in capsys.readouterr().err


def test_fp8_fields_of_a_recipe_become_transformer_engine_settings():
    """The FP8 wiring that only runs on CUDA, checked as data here (no GPU on this machine):
    the recipe's fields are what TransformerConfig receives; the CPU path refuses FP8 (see
    tests/test_cli.py)."""
    from megatron_foresight.models.provider import fp8_settings

    assert fp8_settings(_load("recipes/70b/wm_amt.yaml").model) == dict(
        fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024,
        fp8_amax_compute_algo="max")
    assert fp8_settings(_load("recipes/1b/wm_amt.yaml").model) == {}  # 1B trains in bf16
