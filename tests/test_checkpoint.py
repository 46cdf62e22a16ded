"""Checkpoints: exact resume, atomic saves, and loading at another tensor-parallel size."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers.run import REPO, foresight, losses, megatron_forward, metrics, train

pytestmark = pytest.mark.slow


def test_interrupted_run_resumes_exactly(baseline_run, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, cache_dir=data_cache, extra=["--stop-at-step", "3"])
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3]
    out = train(run_dir, cache_dir=data_cache, extra=["--resume"]).stdout
    assert "resumed from" in out and "step_0000003" in out
    # Steps 4..6 after the resume equal steps 4..6 of the uninterrupted run, bit for bit: model,
    # Adam moments, LR schedule, RNG and data position all came back.
    assert losses(run_dir) == losses(baseline_run)
    assert [m["lr"] for m in metrics(run_dir)] == [m["lr"] for m in metrics(baseline_run)]


def test_resume_after_crash_during_save_uses_last_complete_checkpoint(data_cache, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, ["checkpoint.save_interval=2"], cache_dir=data_cache,
          extra=["--stop-at-step", "4"])
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000004"
    # Simulate a crash halfway through saving step 6: a partial directory, no `latest` update.
    partial = ckpts / "step_0000006.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 100)
    # ... and a crash that even lost `latest`: the newest complete checkpoint must be found.
    (ckpts / "latest").unlink()
    out = train(run_dir, ["checkpoint.save_interval=2"], cache_dir=data_cache,
                extra=["--resume"]).stdout
    assert "step_0000004" in out
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert not partial.exists()  # the next save of that step replaced it
    assert (ckpts / "latest").read_text().strip() == "step_0000006"
    # keep_last: 2 in the recipe
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000004", "step_0000006"]


def test_existing_run_dir_needs_resume(baseline_run):
    proc = foresight(["train", str(REPO / "tests/recipes/tiny-test.yaml"), "--run-dir",
                      str(baseline_run)], check=False)
    assert proc.returncode != 0
    assert "already has checkpoints; pass --resume" in proc.stderr + proc.stdout


def _logits(ckpt, out, nproc: int, *overrides):
    tokens = np.random.default_rng(0).integers(0, 259, (2, 64))
    return megatron_forward(ckpt, tokens, out, nproc, overrides)


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_same_logits(data_cache, tmp_path):
    run_dir = tmp_path / "tp2"
    train(run_dir, ["parallel.tensor_model_parallel_size=2"], nproc=2, cache_dir=data_cache)
    ckpt = str(run_dir / "checkpoints")
    at_tp2 = _logits(ckpt, tmp_path / "tp2.npy", 2, "parallel.tensor_model_parallel_size=2")
    at_tp1 = _logits(ckpt, tmp_path / "tp1.npy", 1, "parallel.tensor_model_parallel_size=1")
    assert at_tp1.shape == at_tp2.shape == (2, 64, 384)
    assert np.abs(at_tp1 - at_tp2).max() < 1e-4
    # and the trained weights really were loaded: a fresh model gives different logits
    fresh = _logits("none", tmp_path / "fresh.npy", 1, "parallel.tensor_model_parallel_size=1")
    assert np.abs(fresh - at_tp1).max() > 1e-2


def test_init_from_another_run_loads_weights_only(baseline_run, data_cache, tmp_path):
    run_dir = tmp_path / "finetune"
    train(run_dir, [f"checkpoint.init_from={baseline_run}", "schedule.train_steps=2"],
          cache_dir=data_cache)
    first = metrics(run_dir)[0]
    # starts from the trained model (loss near the baseline's last), with a fresh schedule
    assert first["lm_loss"] < metrics(baseline_run)[0]["lm_loss"] - 1.0
    assert f"init_from: {baseline_run}" in (run_dir / "config.yaml").read_text()


def test_init_from_in_bf16_trains_on_from_the_loaded_weights(baseline_run, data_cache, tmp_path):
    """In bf16 the optimizer steps fp32 copies of the weights. Before they were refreshed after
    init_from, step 1 started from the loaded weights and wrote the random initial ones back:
    step 2's loss was that of a fresh model (ln 384 = 5.95 here)."""
    run_dir = tmp_path / "bf16"
    train(run_dir, [f"checkpoint.init_from={baseline_run}", "schedule.train_steps=3",
                    "model.precision=bf16"], cache_dir=data_cache)
    fresh = metrics(baseline_run)[0]["lm_loss"]
    assert all(m["lm_loss"] < fresh - 1.0 for m in metrics(run_dir)), metrics(run_dir)


def test_stop_signal_saves_before_exit(data_cache, tmp_path):
    """SIGTERM (preemption, scancel) mid-run: the step in flight finishes, a checkpoint is
    written, the process exits 0, and --resume continues from there."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_foresight", "train",
           str(REPO / "tests/recipes/tiny-test.yaml"), f"data.cache_dir={data_cache}",
           "schedule.train_steps=200", "schedule.warmup_steps=1", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    steps = [m["step"] for m in metrics(run_dir)]
    assert 1 <= steps[-1] < 200
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps[-1]:07d}"
    assert "received SIGTERM" in out
    out = train(run_dir, ["schedule.train_steps=200", "schedule.warmup_steps=1"],
                cache_dir=data_cache, extra=["--resume", "--stop-at-step", str(steps[-1] + 1)]).stdout
    assert f"at step {steps[-1]}" in out


@pytest.mark.parametrize("before,after", [
    (["parallel.pipeline_model_parallel_size=2"], ["parallel.tensor_model_parallel_size=2"]),
    (["parallel.use_distributed_optimizer=true"], ["parallel.use_distributed_optimizer=true"]),
    (["parallel.use_distributed_optimizer=true", "checkpoint.optimizer_sharding=dp_reshardable"],
     ["parallel.use_distributed_optimizer=true", "checkpoint.optimizer_sharding=dp_reshardable"]),
], ids=["pp2_to_tp2", "dp2_distributed_optimizer_to_dp1", "dp2_dp_reshardable_to_dp1"])
def test_resume_at_another_layout_continues_the_same_run(before, after, baseline_run, data_cache,
                                                          tmp_path):
    """Stop after step 3 and resume at another layout: model and Adam state are resharded, so
    steps 4..6 match the uninterrupted single-process run (to float tolerance, as between
    layouts: only the reduction order differs)."""
    run_dir = tmp_path / "run"
    train(run_dir, before, nproc=2, cache_dir=data_cache, extra=["--stop-at-step", "3"])
    nproc = 2 if "tensor" in " ".join(after) else 1
    out = train(run_dir, after, nproc=nproc, cache_dir=data_cache, extra=["--resume"]).stdout
    assert "resumed from" in out
    assert losses(run_dir) == pytest.approx(losses(baseline_run), abs=2e-4)


def test_resume_refuses_to_switch_optimizer_kind(data_cache, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, ["parallel.use_distributed_optimizer=true"], nproc=2, cache_dir=data_cache,
          extra=["--stop-at-step", "1"])
    proc = train(run_dir, cache_dir=data_cache, extra=["--resume"], check=False)
    assert proc.returncode == 2
    assert ("saved with parallel.use_distributed_optimizer=true and this run has false"
            in proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
