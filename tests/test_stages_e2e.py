"""The three stages end to end through the real command line on the medium world (slow): WM-AMT
raises next-observation accuracy; FE-SFT from it writes foresight that eval scores; FC-RL from
that raises validation reward and lowers the value's Brier score, resumes exactly after a stop
(GRPO, and PPO with its value head), and gives the losses of one process at TP=2 and at PP=2.

Everything here starts from the session's medium-world runs (`conftest.medium_wm_amt`,
`conftest.medium_fe_sft`), trained once per session."""

import json

import pytest

from conftest import MEDIUM_WM_AMT
from megatron_foresight.eval.agent_eval import METRICS
from helpers.run import REPO, foresight

# The first test to need the trained FE-SFT policy pays for it (world, WM-AMT, FE-SFT: ~4 min):
# pytest-timeout counts fixture set-up against that test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

RECIPES = REPO / "recipes" / "tiny-cpu"


def _eval(recipe, world, cache, out, ckpt=None, tasks=0, seq_length=512):
    args = ["eval", str(RECIPES / recipe), f"data.world={world}",
            f"data.cache_dir={cache}", *MEDIUM_WM_AMT, f"data.seq_length={seq_length}",
            "--tasks", str(tasks), "--out", str(out), "--max-new-tokens", "200"]
    foresight(args + (["--ckpt", str(ckpt)] if ckpt else []))
    return json.loads(out.read_text())["metrics"]


def test_wm_amt_raises_next_observation_accuracy(medium_world, medium_cache, medium_wm_amt,
                                                 tmp_path):
    """Measured (seed 11 world, 40 steps, bf16): accuracy 0.000 -> 0.524, loss 7.03 -> 2.47."""
    before = _eval("wm_amt.yaml", medium_world, medium_cache, tmp_path / "before.json")
    after = _eval("wm_amt.yaml", medium_world, medium_cache, tmp_path / "after.json",
                  medium_wm_amt)
    print(f"next-observation accuracy {before['val/acc/observation']:.3f} -> "
          f"{after['val/acc/observation']:.3f}, loss {before['val/loss/observation']:.2f} -> "
          f"{after['val/loss/observation']:.2f}")
    assert after["val/acc/observation"] >= before["val/acc/observation"] + 0.30
    assert after["val/loss/observation"] < before["val/loss/observation"] - 2.0


def test_fe_sft_from_wm_amt_writes_foresight_that_eval_scores(medium_world, medium_cache,
                                                              medium_fe_sft, tmp_path):
    """FE-SFT from the WM-AMT checkpoint (the shared 300-step run): eval plays and scores every
    episode, and most turns parse strictly. Measured: format validity 0.562 on the 4 tasks,
    rollout loss 0.49."""
    fe = _eval("fe_sft.yaml", medium_world, medium_cache, tmp_path / "fe.json", medium_fe_sft,
               tasks=4, seq_length=768)
    episodes = [json.loads(x) for x in (tmp_path / "fe.json.episodes.jsonl").read_text().split("\n")
                if x]
    assert [e["task_id"].split("-")[0] for e in episodes] == ["search", "math"] * 2
    assert all(e["turns"] and e["ended"] for e in episodes)
    assert set(METRICS) <= set(fe) and fe["turns_per_episode"] >= 1
    print(f"format validity {fe['format_validity']:.3f}, rollout loss {fe['val/loss/rollout']:.2f}")
    assert fe["val/loss/rollout"] < 1.5
    assert fe["format_validity"] >= 0.45


# FC-RL ----------------------------------------------------------------------------------------

RL_RECIPE = str(RECIPES / "fc_rl.yaml")
TINY = ["data.seq_length=512", "schedule.global_batch_size=4", "schedule.micro_batch_size=2",
        "schedule.eval_interval=0", "checkpoint.save_interval=1", "logging.tensorboard=false",
        "fc_rl.prompts_per_step=2", "fc_rl.group_size=2", "fc_rl.max_new_tokens=96",
        "fc_rl.validation_tasks=0",
        # the machinery at the temperature where the engine's log-probs are the trainer's:
        # `logprob_gap_mean` exists only there
        "fc_rl.temperature=1.0"]


@pytest.fixture(scope="module")
def straight(medium_world, medium_fe_sft, tmp_path_factory):
    """Two RL steps without interruption (TP=1), logged every step."""
    tmp = tmp_path_factory.mktemp("fc-rl-straight")
    _train(medium_world, tmp, tmp / "run", "schedule.train_steps=2", "logging.log_interval=1",
           policy=medium_fe_sft)
    return tmp / "run"


def _steps(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").open())}


def _train(world, tmp_path, run_dir, *extra, nproc=1, policy=None):
    return foresight(["train", RL_RECIPE, f"data.world={world}", f"checkpoint.init_from={policy}",
                      f"data.cache_dir={tmp_path / 'cache'}", *TINY, *extra,
                      "--run-dir", str(run_dir)], nproc=nproc)


def test_rl_resumes_mid_training_exactly(medium_world, medium_fe_sft, straight, tmp_path):
    split = tmp_path / "split"
    args = ("schedule.train_steps=2", "logging.log_interval=1")
    _train(medium_world, tmp_path, split, *args, "--stop-at-step", "1", policy=medium_fe_sft)
    assert not (split / "checkpoints" / "step_0000002").exists()
    _train(medium_world, tmp_path, split, *args, "--resume", policy=medium_fe_sft)
    a, b = _steps(straight), _steps(split)
    # step 1 really updated the policy, so step 2's episodes come from the restored update
    assert a[1]["grad_norm"] > 0
    for key in ("reward/total", "logprob_gap_mean", "policy_loss", "grad_norm",
                "rollout/agent_tokens"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("layout", ["tensor_model_parallel_size", "pipeline_model_parallel_size"])
def test_tp2_or_pp2_rollouts_and_update_match_one_process(medium_world, medium_fe_sft, straight,
                                                          tmp_path, layout):
    """TP=2, and PP=2 (hidden states passed between stages at every decoded token, the last
    stage drawing for both), against step 1 of the one-process run (the same seeds: step 1
    does not see step 2)."""
    two = tmp_path / "two"
    _train(medium_world, tmp_path, two, "schedule.train_steps=1", "logging.log_interval=1",
           f"parallel.{layout}=2", nproc=2, policy=medium_fe_sft)
    a, b = _steps(straight)[1], _steps(two)[1]
    assert a["grad_norm"] > 0  # the advantages were not all zero: the comparison means something
    assert b["rollout/agent_tokens"] == a["rollout/agent_tokens"]  # the same episodes
    for key in ("reward/total", "policy_loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_tempered_policy_trains_the_distribution_it_samples(medium_world, medium_fe_sft,
                                                           tmp_path):
    """`fc_rl.tempered_policy` at the tiny recipe's temperature 0.5: the trainer recomputes the
    log-probs the sampler drew with (the gap is logged, and as small as float rounding, as at
    1.0), so the importance ratio starts at 1 for the tempered policy, and the step trains.
    The KL reference is tempered too: its KL to the policy it equals at the step's start stays
    near 0."""
    run = tmp_path / "tempered"
    _train(medium_world, tmp_path, run, "schedule.train_steps=1", "logging.log_interval=1",
           "fc_rl.temperature=0.5", "fc_rl.tempered_policy=true", "fc_rl.kl_coef=0.1",
           policy=medium_fe_sft)
    step = _steps(run)[1]
    print(f"gap mean {step['logprob_gap_mean']:.2e}, max {step['logprob_gap_max']:.2e}, "
          f"ratio {step['ratio_mean']:.6f}, kl {step['kl']:.2e}, grad norm "
          f"{step['grad_norm']:.4f}")
    assert step["logprob_gap_mean"] < 1e-4 and step["logprob_gap_max"] < 1e-3
    assert step["kl"] < 1e-3
    assert step["grad_norm"] > 0


def test_rollout_by_rounds_plays_the_continuous_rollouts_episodes(medium_world, medium_fe_sft,
                                                                 straight, tmp_path):
    """`fc_rl.rollout: rounds` (one turn of every episode per batch) against the default
    continuous schedule of the `straight` run: per-episode random streams, so step 1 plays the
    same episodes and makes the same update (log-probs differ by float rounding)."""
    rounds = tmp_path / "rounds"
    _train(medium_world, tmp_path, rounds, "schedule.train_steps=1", "logging.log_interval=1",
           "fc_rl.rollout=rounds", policy=medium_fe_sft)
    a, b = _steps(straight)[1], _steps(rounds)[1]
    assert a["grad_norm"] > 0
    assert b["rollout/agent_tokens"] == a["rollout/agent_tokens"]
    for key in ("reward/total", "policy_loss", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_ppo_with_its_value_head_resumes_exactly(medium_world, medium_fe_sft, tmp_path):
    """PPO's critic starts fresh on the FE-SFT weights, is trained, saved and restored: the
    second step of a resumed run equals the uninterrupted run's, value loss included."""
    args = ("fc_rl.algorithm=ppo", "schedule.train_steps=2", "logging.log_interval=1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = _train(medium_world, tmp_path, straight, *args, policy=medium_fe_sft)
    assert "value_head. newly initialized" in proc.stdout + proc.stderr
    _train(medium_world, tmp_path, split, *args, "--stop-at-step", "1", policy=medium_fe_sft)
    _train(medium_world, tmp_path, split, *args, "--resume", policy=medium_fe_sft)
    a, b = _steps(straight), _steps(split)
    assert a[1]["grad_norm"] > 0 and a[1]["value_loss"] > 0
    assert a[2]["critic/value_mean"] != 0  # step 1 moved the critic, which was zero at start
    for key in ("reward/total", "critic/value_mean", "critic/return_mean", "policy_loss",
                "value_loss", "grad_norm"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key


def test_rloo_trains_and_resumes_exactly(medium_world, medium_fe_sft, tmp_path):
    """RLOO through the same interface as GRPO and PPO: it moves the policy, and a run stopped
    after step 1 and resumed gives step 2 of the uninterrupted run."""
    args = ("fc_rl.algorithm=rloo", "schedule.train_steps=2", "logging.log_interval=1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(medium_world, tmp_path, straight, *args, policy=medium_fe_sft)
    _train(medium_world, tmp_path, split, *args, "--stop-at-step", "1", policy=medium_fe_sft)
    _train(medium_world, tmp_path, split, *args, "--resume", policy=medium_fe_sft)
    a, b = _steps(straight), _steps(split)
    assert a[1]["grad_norm"] > 0 and yaml_algorithm(straight) == "rloo"
    for key in ("reward/total", "policy_loss", "grad_norm", "rollout/agent_tokens"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key


def yaml_algorithm(run_dir) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["fc_rl"]["algorithm"]["type"]


RL_STEPS = 6


def test_rl_raises_validation_reward_and_lowers_value_brier(medium_world, medium_fe_sft,
                                                            tmp_path):
    """Sampling at the recipe's temperature 0.5, measured at steps 0, 3, 6 (16 validation tasks,
    greedy): mean reward -0.272, -0.123, -0.119; value Brier 0.361, 0.088, 0.066; format
    validity 0.698, 0.745, 0.745. At temperature 1.0 the rise was 0.193 from this policy
    (-0.272 -> -0.080, Brier 0.361 -> 0.016), 0.192 and 0.451 from earlier ones. Greedy
    episodes of one policy on the same tasks score the same every time, so the whole rise is
    the updates' doing: 0.1 asks for two thirds of the smallest rise measured, well clear of a
    no-op's 0."""
    run = tmp_path / "rl"
    foresight(["train", RL_RECIPE, f"data.world={medium_world}",
               f"data.cache_dir={tmp_path / 'cache'}",
               "data.seq_length=768", f"checkpoint.init_from={medium_fe_sft}",
               f"schedule.train_steps={RL_STEPS}", "schedule.eval_interval=3",
               "checkpoint.save_interval=0", "logging.tensorboard=false",
               "fc_rl.max_new_tokens=200", "fc_rl.validation_tasks=16", "--run-dir", str(run)])
    steps = _steps(run)
    # step 0 is the FE-SFT policy, validated before the first update (schedule.eval_at_start)
    curve = {k: [round(steps[s][k], 3) for s in (0, 3, RL_STEPS)]
             for k in ("val/reward/total", "val/value_brier", "val/format_validity")}
    print(curve)
    before, after = steps[0], steps[RL_STEPS]
    for s in range(1, RL_STEPS + 1):  # a group with task signal holds a success
        signal, task = steps[s]["rollout/task_signal_groups"], steps[s]["reward/task"]
        assert 0 <= signal <= 1 and (task > 0 or signal == 0), (s, signal, task)
    assert before["val/format_validity"] > 0.5  # the policy writes foresight to begin with
    assert after["val/reward/total"] >= before["val/reward/total"] + 0.1
    assert after["val/value_brier"] <= before["val/value_brier"] - 0.02
