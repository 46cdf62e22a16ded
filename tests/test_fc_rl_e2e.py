"""FC-RL through the real command line on a small world (slow): a run stopped after an RL step
resumes from its checkpoint and continues exactly as an uninterrupted run (GRPO, and PPO with its
value head); TP=2 and PP=2 rollouts and update give the losses of one process."""

import json

import pytest

from helpers.run import REPO, foresight

RECIPE = str(REPO / "recipes" / "tiny-cpu" / "fc_rl.yaml")
TINY = ["data.seq_length=512", "schedule.global_batch_size=4", "schedule.micro_batch_size=2",
        "schedule.eval_interval=0", "checkpoint.save_interval=1", "logging.tensorboard=false",
        "fc_rl.prompts_per_step=2", "fc_rl.group_size=2", "fc_rl.max_new_tokens=96",
        "fc_rl.validation_tasks=0"]


@pytest.fixture(scope="module")
def policy(small_world, tmp_path_factory):
    """A short FE-SFT run: a policy that writes some foresight, so the episodes of a group earn
    different rewards and the RL update is not zero (a random model's are all equal)."""
    run_dir = tmp_path_factory.mktemp("fc-rl-policy") / "fe_sft"
    foresight(["train", str(REPO / "recipes" / "tiny-cpu" / "fe_sft.yaml"),
               f"data.world={small_world}", "data.seq_length=512", "schedule.train_steps=60",
               "schedule.warmup_steps=5", "schedule.eval_interval=0", "schedule.eval_steps=0",
               "checkpoint.save_interval=0", "logging.tensorboard=false",
               f"data.cache_dir={run_dir.parent / 'cache'}", "--run-dir", str(run_dir)])
    return run_dir


@pytest.fixture(scope="module")
def straight(small_world, policy, tmp_path_factory):
    """Two RL steps without interruption (TP=1), logged every step."""
    tmp = tmp_path_factory.mktemp("fc-rl-straight")
    _train(small_world, tmp, tmp / "run", "schedule.train_steps=2", "logging.log_interval=1",
           policy=policy)
    return tmp / "run"


def _steps(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").open())}


def _train(world, tmp_path, run_dir, *extra, nproc=1, policy=None):
    return foresight(["train", RECIPE, f"data.world={world}", f"checkpoint.init_from={policy}",
                      f"data.cache_dir={tmp_path / 'cache'}", *TINY, *extra,
                      "--run-dir", str(run_dir)], nproc=nproc)


@pytest.mark.slow
def test_rl_resumes_mid_training_exactly(small_world, policy, straight, tmp_path):
    split = tmp_path / "split"
    args = ("schedule.train_steps=2", "logging.log_interval=1")
    _train(small_world, tmp_path, split, *args, "--stop-at-step", "1", policy=policy)
    assert not (split / "checkpoints" / "step_0000002").exists()
    _train(small_world, tmp_path, split, *args, "--resume", policy=policy)
    a, b = _steps(straight), _steps(split)
    # step 1 really updated the policy, so step 2's episodes come from the restored update
    assert a[1]["grad_norm"] > 0
    for key in ("reward/total", "logprob_gap_mean", "policy_loss", "grad_norm",
                "rollout/agent_tokens"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tensor_model_parallel_size", "pipeline_model_parallel_size"])
def test_tp2_or_pp2_rollouts_and_update_match_one_process(small_world, policy, straight,
                                                          tmp_path, layout):
    """TP=2, and PP=2 (hidden states passed between stages at every decoded token, the last
    stage drawing for both), against step 1 of the one-process run (the same seeds: step 1
    does not see step 2)."""
    two = tmp_path / "two"
    _train(small_world, tmp_path, two, "schedule.train_steps=1", "logging.log_interval=1",
           f"parallel.{layout}=2", nproc=2, policy=policy)
    a, b = _steps(straight)[1], _steps(two)[1]
    assert a["grad_norm"] > 0  # the advantages were not all zero: the comparison means something
    assert b["rollout/agent_tokens"] == a["rollout/agent_tokens"]  # the same episodes
    for key in ("reward/total", "policy_loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


@pytest.mark.slow
def test_ppo_with_its_value_head_resumes_exactly(small_world, policy, tmp_path):
    """PPO's critic starts fresh on the FE-SFT weights, is trained, saved and restored: the
    second step of a resumed run equals the uninterrupted run's, value loss included."""
    args = ("fc_rl.algorithm=ppo", "schedule.train_steps=2", "logging.log_interval=1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = _train(small_world, tmp_path, straight, *args, policy=policy)
    assert "value_head. newly initialized" in proc.stdout + proc.stderr
    _train(small_world, tmp_path, split, *args, "--stop-at-step", "1", policy=policy)
    _train(small_world, tmp_path, split, *args, "--resume", policy=policy)
    a, b = _steps(straight), _steps(split)
    assert a[1]["grad_norm"] > 0 and a[1]["value_loss"] > 0
    assert a[2]["critic/value_mean"] != 0  # step 1 moved the critic, which was zero at start
    for key in ("reward/total", "critic/value_mean", "critic/return_mean", "policy_loss",
                "value_loss", "grad_norm"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key
