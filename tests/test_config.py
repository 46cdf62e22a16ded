"""Recipes: loading, overrides, presets, and the errors a user sees for a bad one."""

import textwrap

import pytest

from megatron_foresight.config import ConfigError, load_recipe
from helpers.run import REPO, TEST_RECIPE

LM_RECIPE = REPO / "recipes" / "tiny-cpu" / "lm.yaml"


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


def test_tiny_recipe_resolves_preset_base_and_stage_section():
    cfg = load_recipe(LM_RECIPE)
    assert cfg.stage == "lm" and cfg.name == "tiny-cpu-lm"
    assert cfg.model.num_query_groups == 2 and cfg.model.hidden_size == 256  # from preset tiny
    assert cfg.optimizer.lr == 1e-3  # from base.yaml
    assert cfg.schedule.train_steps == 150  # from lm.yaml
    assert cfg.stage_config.sources == ["builtin"]


def test_overrides_are_typed_and_win():
    cfg = load_recipe(LM_RECIPE, ["schedule.train_steps=7", "optimizer.lr=3e-4",
                                  "model.num_query_groups=null", "lm.sources=[a.jsonl, b.txt]",
                                  "lm.weights=[1, 2]", "schedule.warmup_steps=1"])
    assert cfg.schedule.train_steps == 7
    assert cfg.optimizer.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; floats accept it
    assert cfg.model.num_query_groups is None and cfg.model.query_groups == 8
    assert cfg.stage_config.weights == [1.0, 2.0]


def test_heads_not_divisible_by_tensor_parallel(tmp_path):
    msg = error_of(LM_RECIPE, ["parallel.tensor_model_parallel_size=8"])
    assert "model.num_query_groups: num_query_groups (2) must be divisible by " \
           "tensor_model_parallel_size (8)" in msg
    msg = error_of(LM_RECIPE, ["model.num_attention_heads=12", "model.hidden_size=384",
                               "model.num_query_groups=4", "parallel.tensor_model_parallel_size=8"])
    assert "num_attention_heads (12) must be divisible by tensor_model_parallel_size (8)" in msg
    assert msg.startswith("command line: model.num_attention_heads")


def test_context_parallelism_is_refused_until_the_loop_splits_sequences():
    # every context-parallel rank would be given the whole sequence: wrong, and silent
    msg = error_of(LM_RECIPE, ["parallel.context_parallel_size=2"])
    assert "parallel.context_parallel_size: 2 is not supported yet" in msg
    assert "does not split sequences" in msg and "use 1" in msg


def test_unknown_key_names_the_nearest_valid_one_and_the_line(tmp_path):
    path = write(tmp_path, """
        base: {base}
        stage: lm
        schedule:
          train_step: 10
        """.format(base=REPO / "recipes/tiny-cpu/base.yaml"))
    msg = error_of(path)
    assert msg.startswith(f"{path}:5: schedule.train_step: unknown key")
    assert "did you mean 'train_steps'?" in msg


def test_wrong_type_and_disallowed_value(tmp_path):
    path = write(tmp_path, """
        model:
          num_layers: four
        """)
    assert error_of(path) == f"{path}:3: model.num_layers: expected an integer, got 'four'"
    msg = error_of(LM_RECIPE, ["model.precision=fp64"])
    assert "model.precision: 'fp64' is not allowed; choose one of 'fp32', 'bf16', 'fp16'" in msg


def test_batch_and_layer_divisibility():
    msg = error_of(LM_RECIPE, ["schedule.global_batch_size=10", "schedule.micro_batch_size=4"])
    assert "schedule.global_batch_size: global_batch_size (10) must be a multiple of " \
           "micro_batch_size (4)" in msg
    msg = error_of(LM_RECIPE, ["parallel.pipeline_model_parallel_size=3"])
    assert "model.num_layers: num_layers (4) must be divisible by pipeline_model_parallel_size (3)" \
        in msg
    msg = error_of(LM_RECIPE, ["data.seq_length=4096"])
    assert "seq_length (4096) exceeds model.max_position_embeddings (1024)" in msg


def test_world_size_checks_run_before_any_process_group():
    cfg = load_recipe(LM_RECIPE, ["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"world size \(3 processes\) must be divisible"):
        cfg.check_world_size(3)
    cfg = load_recipe(LM_RECIPE)
    with pytest.raises(ConfigError, match=r"global_batch_size \(16\) must be a multiple of "
                                          r"micro_batch_size \(4\) x data-parallel size \(8\)"):
        cfg.check_world_size(8)
    cfg.check_world_size(4)


def test_bad_yaml_reports_the_line(tmp_path):
    path = write(tmp_path, """
        model:
          num_layers: 2
         hidden_size: 3
        """)
    assert error_of(path).startswith(f"{path}:")
    assert "not valid YAML" in error_of(path)


def test_missing_file_cycle_and_unknown_preset_or_stage(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "nope.yaml")
    a = write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    assert "cycle" in error_of(a)
    assert "unknown preset 'llama3-9b' (did you mean 'llama3-8b'?)" in \
        error_of(LM_RECIPE, ["model.preset=llama3-9b"])
    assert "stage: unknown stage 'lmm' (did you mean 'lm'?)" in error_of(LM_RECIPE, ["stage=lmm"])


def test_stage_section_is_validated_by_the_plugin():
    msg = error_of(LM_RECIPE, ["lm.weights=[1, 2]"])
    assert "lm.weights: needs one weight per source (1)" in msg
    msg = error_of(LM_RECIPE, ["lm.sorces=[x]"])
    assert "lm.sorces: unknown key" in msg and "did you mean 'sources'?" in msg


def test_fp8_and_schedule_rules():
    assert "set model.precision: bf16" in error_of(LM_RECIPE, ["model.fp8=hybrid"])
    assert "warmup_steps: must be in [0, decay_steps=150)" in \
        error_of(LM_RECIPE, ["schedule.warmup_steps=150"])
    assert "optimizer.min_lr" in error_of(LM_RECIPE, ["optimizer.min_lr=1"])
    assert "schedule.anneal_steps: decay_style: wsd needs anneal_steps >= 1" in \
        error_of(LM_RECIPE, ["schedule.decay_style=wsd"])
    assert "only decay_style: wsd anneals" in error_of(LM_RECIPE, ["schedule.anneal_steps=10"])


def test_wsd_holds_the_peak_then_anneals_to_min_lr_over_anneal_steps():
    """Megatron's own scheduler, as build_scheduler sets it up from the recipe."""
    import torch
    from megatron_foresight.training.optimizer import build_scheduler

    cfg = load_recipe(LM_RECIPE, ["schedule.train_steps=100", "schedule.warmup_steps=10",
                                  "schedule.decay_style=wsd", "schedule.anneal_steps=20",
                                  "optimizer.lr=1e-3", "optimizer.min_lr=1e-4"])

    class Optimizer:  # what the scheduler touches: the parameter groups' lr and weight decay
        param_groups = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0).param_groups

    scheduler, lrs = build_scheduler(cfg, Optimizer()), []
    for _ in range(100):
        scheduler.step(1)
        lrs.append(Optimizer.param_groups[0]["lr"])
    assert lrs[4] == pytest.approx(5e-4)  # warmup: step 5 of 10
    assert lrs[9:80] == [pytest.approx(1e-3)] * 71  # steps 10-80 at the peak
    assert 1e-4 < lrs[89] < lrs[80] < 1e-3  # falling over the last 20
    assert lrs[99] == pytest.approx(1e-4)
    # a run shortened below its anneal anneals over all its steps after warmup
    short = load_recipe(LM_RECIPE, ["schedule.train_steps=4", "schedule.warmup_steps=0",
                                    "schedule.decay_style=wsd", "schedule.anneal_steps=100"])
    assert short.schedule.lr_anneal_steps == 4


def test_presets_match_published_shapes():
    cfg = load_recipe(LM_RECIPE, ["model.preset=llama3-70b", "parallel.tensor_model_parallel_size=8",
                                  "model.make_vocab_size_divisible_by=128"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.num_query_groups, m.rotary_base) == (80, 8192, 28672, 64, 8, 500_000)
    assert cfg.padded_vocab_size(128_256) == 128_256
    qwen = load_recipe(LM_RECIPE, ["model.preset=qwen2.5-7b"]).model
    assert qwen.add_qkv_bias and qwen.family == "qwen2" and qwen.num_query_groups == 4


def test_padded_vocab_does_not_depend_on_tensor_parallel_size():
    sizes = {load_recipe(LM_RECIPE, [f"parallel.tensor_model_parallel_size={tp}"])
             .padded_vocab_size(259) for tp in (1, 2)}
    assert sizes == {384}
    msg = error_of(LM_RECIPE, ["parallel.tensor_model_parallel_size=2",
                               "model.make_vocab_size_divisible_by=3"])
    assert "make_vocab_size_divisible_by (3) must be divisible by tensor_model_parallel_size (2)" \
        in msg


def test_recipe_keys_are_a_reviewed_surface():
    """Every recipe key, listed. A new knob fails this test until tests/recipe_keys.txt is
    updated in the same change, so each addition to the config surface is reviewed."""
    from megatron_foresight.config import RecipeConfig
    from megatron_foresight.configtree import describe
    from megatron_foresight.training.plugin import available_stages, load_plugin

    stages = {stage: load_plugin(stage).Config for stage in available_stages()}
    keys = [ln.split()[0] for ln in describe(RecipeConfig, extra_sections=stages)
            if ln.startswith("  ") and not ln.startswith("      ")]
    expected = (REPO / "tests" / "recipe_keys.txt").read_text().split()
    assert keys == expected


def test_every_recipe_in_the_repo_loads():
    for path in sorted((REPO / "recipes").rglob("*.yaml")) + [TEST_RECIPE]:
        if path.name not in ("base.yaml", "cluster.yaml"):  # bases are not whole recipes
            load_recipe(path)
