"""WM-AMT then FE-SFT through the real command line on a small built world (slow)."""

import json

import pytest

from megatron_foresight.eval.agent_eval import METRICS
from megatron_foresight.world.build import build_world
from megatron_foresight.world.sizes import WorldSizes
from helpers.run import REPO, foresight

SIZES = WorldSizes(cities=40, people=120, guilds=16, search_tasks=400, math_tasks=400,
                   trajectories=400, validation_trajectories=40, mc_samples=4, vocab_size=1024)
SHORT = ["data.seq_length=512", "schedule.train_steps=40", "schedule.eval_interval=0",
         "schedule.eval_steps=4", "schedule.warmup_steps=4", "checkpoint.save_interval=0",
         "logging.tensorboard=false"]


def _eval(recipe, world, cache, out, ckpt=None, tasks=0):
    args = ["eval", str(REPO / "recipes" / "tiny-cpu" / recipe), f"data.world={world}",
            f"data.cache_dir={cache}", *SHORT, "--tasks", str(tasks), "--out", str(out),
            "--max-new-tokens", "200"]
    foresight(args + (["--ckpt", str(ckpt)] if ckpt else []))
    return json.loads(out.read_text())["metrics"]


@pytest.mark.slow
def test_wm_amt_raises_next_observation_accuracy_then_fe_sft_runs_from_it(tmp_path):
    """Measured (seed 11 world, 40 steps): accuracy 0.000 -> 0.526, loss 7.03 -> 2.47. FE-SFT
    at this budget does not yet write parseable foresight (see issue 5's note): this part checks
    that it trains from the WM-AMT checkpoint and that eval plays and scores every episode."""
    world, cache = tmp_path / "world", tmp_path / "cache"
    build_world(world, seed=11, sizes=SIZES, progress=False)
    before = _eval("wm_amt.yaml", world, cache, tmp_path / "before.json")
    foresight(["train", str(REPO / "recipes" / "tiny-cpu" / "wm_amt.yaml"), f"data.world={world}",
               f"data.cache_dir={cache}", *SHORT, "--run-dir", str(tmp_path / "wm")])
    after = _eval("wm_amt.yaml", world, cache, tmp_path / "after.json", tmp_path / "wm")
    print(f"next-observation accuracy {before['val/acc/observation']:.3f} -> "
          f"{after['val/acc/observation']:.3f}")
    assert after["val/acc/observation"] >= before["val/acc/observation"] + 0.30
    assert after["val/loss/observation"] < before["val/loss/observation"] - 2.0

    foresight(["train", str(REPO / "recipes" / "tiny-cpu" / "fe_sft.yaml"), f"data.world={world}",
               f"data.cache_dir={cache}", *SHORT, "schedule.train_steps=20", f"checkpoint.init_from={tmp_path / 'wm'}",
               "--run-dir", str(tmp_path / "fe")])
    fe = _eval("fe_sft.yaml", world, cache, tmp_path / "fe.json", tmp_path / "fe", tasks=4)
    episodes = [json.loads(x) for x in (tmp_path / "fe.json.episodes.jsonl").read_text().split("\n")
                if x]
    assert [e["task_id"].split("-")[0] for e in episodes] == ["search", "math"] * 2
    assert all(e["turns"] and e["ended"] for e in episodes)
    assert set(METRICS) <= set(fe) and fe["turns_per_episode"] >= 1
    assert fe["val/loss/rollout"] < 3.0
