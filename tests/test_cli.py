"""The command line a user meets first: help texts, the dry run, and error exits."""

import pytest

from helpers.run import foresight


def test_help_lists_subcommands_and_each_has_its_own_help():
    out = foresight(["--help"]).stdout
    for command in ("train", "config"):
        assert command in out
        sub = foresight([command, "--help"]).stdout
        assert f"usage: foresight {command}" in sub
    train_help = foresight(["train", "--help"]).stdout
    assert "--resume" in train_help and "torchrun" in train_help and "--run-dir" in train_help


def test_config_dry_run_prints_the_resolved_recipe():
    proc = foresight(["config", "recipes/tiny-cpu/lm.yaml", "schedule.train_steps=90",
                      "--world-size", "2"])
    assert "train_steps: 90" in proc.stdout
    assert "num_query_groups: 2" in proc.stdout  # from the preset
    assert "valid for 2 process(es)" in proc.stderr


def test_overrides_may_follow_options_and_stray_words_are_refused():
    proc = foresight(["config", "recipes/tiny-cpu/lm.yaml", "--world-size", "2",
                      "schedule.train_steps=90", "seed=5"])
    assert "train_steps: 90" in proc.stdout and "seed: 5" in proc.stdout
    from megatron_foresight.cli import parse_args

    args = parse_args(["train", "r.yaml", "a.b=1", "--resume", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.resume
    for stray in (["train", "r.yaml", "--resume", "oops"], ["train", "r.yaml", "--nope"]):
        with pytest.raises(SystemExit):
            parse_args(stray)


def test_config_keys_documents_every_key():
    out = foresight(["config", "--keys"]).stdout
    assert "model.num_query_groups (an integer or null; default None)" in out
    assert "Key/value heads for grouped-query attention" in out
    assert "lm.sources" in out


@pytest.mark.parametrize("args, message", [
    (["config", "recipes/tiny-cpu/lm.yaml", "schedule.trian_steps=3"],
     "command line: schedule.trian_steps: unknown key in section 'schedule'; did you mean "
     "'train_steps'?"),
    (["config", "recipes/tiny-cpu/lm.yaml", "parallel.tensor_model_parallel_size=2",
      "--world-size", "3"], "parallel: world size (3 processes) must be divisible by tensor x "
                            "pipeline x context parallel size (2 x 1 x 1 = 2)"),
    (["config", "recipes/tiny-cpu/lm.yaml", "--world-size", "3"],
     "global_batch_size (16) must be a multiple of micro_batch_size (4) x data-parallel size (3)"),
    (["config", "recipes/tiny-cpu/nope.yaml"], "recipe file not found"),
    # what FC-RL refuses, the dry run refuses too (its checks run when the recipe loads)
    (["config", "recipes/tiny-cpu/fc_rl.yaml", "fc_rl.prompts_per_step=3", "fc_rl.group_size=3"],
     "fc_rl.yaml:19: schedule.micro_batch_size: the pipelined log-prob passes need equal "
     "microbatches"),
    (["config", "recipes/tiny-cpu/fc_rl.yaml", "fc_rl.kl_coef=0.1"],
     "fc_rl.kl_coef: KL needs a reference model: set checkpoint.init_from"),
    (["train", "recipes/tiny-cpu/lm.yaml", "model.fp8=hybrid", "model.precision=bf16"],
     "model.fp8: FP8 ('hybrid') needs a CUDA GPU with Transformer Engine"),
    (["train", "recipes/tiny-cpu/lm.yaml", "model.transformer_impl=transformer_engine"],
     "model.transformer_impl: transformer_engine needs a CUDA GPU"),
])
def test_bad_input_fails_fast_with_a_clear_message(args, message):
    proc = foresight(args, check=False, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sequence_parallel_is_refused_on_the_cpu_path(tmp_path):
    proc = foresight(["train", "recipes/tiny-cpu/lm.yaml", "parallel.tensor_model_parallel_size=2",
                      "parallel.sequence_parallel=true", "--run-dir", str(tmp_path / "r")],
                     nproc=2, check=False, timeout=180)
    assert proc.returncode != 0
    assert "parallel.sequence_parallel: needs Transformer Engine (or Apex) layers" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before a run directory was made
