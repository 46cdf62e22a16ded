"""Faults injected into training runs and their checkpoints: damaged files, a broken `latest`,
a model that does not fit, non-finite losses, two trainers on one run directory, a stale lock,
a full disk, and SIGKILL at random moments. Each case used to lose data or end in a traceback;
each must now leave the last good checkpoint loadable and say in one line what happened."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers.run import REPO, TEST_RECIPE, foresight, losses, metrics, train

from megatron_foresight.training import checkpoint as ckpt
from megatron_foresight.training import integrity

SAVE_EVERY_2 = ["checkpoint.save_interval=2"]


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, data_cache) -> Path:
    """tiny-test trained 6 steps, saving every 2 (keep_last 2: step_4 and step_6 remain)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    train(run_dir, SAVE_EVERY_2, cache_dir=data_cache)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# --------------------------------------------------------------------------------------------
# damaged checkpoints


def _flip(file: Path, offset: int, length: int = 4096) -> None:
    with file.open("r+b") as f:
        f.seek(offset)
        original = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in original))


@pytest.mark.slow
def test_bit_flip_is_found_and_resume_falls_back_to_the_intact_checkpoint(
        saved_run, baseline_run, data_cache, tmp_path):
    """4 KiB flipped inside a tensor file used to load without complaint (then NaN, and the
    NaN checkpoint became `latest`). Now the manifest names the file, the damaged checkpoint is
    moved aside, and the run resumes from step 4 with exactly the uninterrupted run's losses."""
    run_dir = _copy(saved_run, tmp_path)
    step6 = run_dir / "checkpoints" / "step_0000006"
    _flip(step6 / "__0_0.distcp", (step6 / "__0_0.distcp").stat().st_size // 2)
    proc = train(run_dir, SAVE_EVERY_2, cache_dir=data_cache, extra=["--resume"])
    out = proc.stdout + proc.stderr
    assert "step_0000006 is damaged" in out and "__0_0.distcp" in out and "SHA-256" in out
    assert "resumed from" in out and "step_0000004 at step 4" in out
    assert losses(run_dir) == losses(baseline_run)
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "step_0000006.damaged").is_dir()
    integrity.verify(run_dir / "checkpoints" / "step_0000006")  # saved anew, intact


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGE = {
    "truncated_distcp": ("__0_1.distcp", _truncate, "bytes, "),
    "empty_distcp": ("__0_0.distcp", lambda f: f.write_bytes(b""), "has 0 bytes"),
    "missing_distcp": ("__0_1.distcp", Path.unlink, "is missing"),
    "truncated_common_pt": ("common.pt", _truncate, "bytes, "),
    "missing_metadata": (".metadata", Path.unlink, "is missing"),
    "garbage_metadata": (".metadata", lambda f: f.write_bytes(os.urandom(f.stat().st_size)),
                         "SHA-256"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_files_are_named(case, saved_run, tmp_path):
    step = tmp_path / "step_0000006"
    shutil.copytree(saved_run / "checkpoints" / "step_0000006", step)
    name, damage, why = DAMAGE[case]
    damage(step / name)
    with pytest.raises(integrity.CheckpointDamaged) as caught:
        integrity.verify(step)
    assert str(step / name) in str(caught.value) and why in str(caught.value)


@pytest.mark.slow
def test_damaged_init_from_is_one_line_naming_the_file(saved_run, data_cache, tmp_path):
    source = _copy(saved_run, tmp_path)
    _truncate(source / "checkpoints" / "step_0000006" / "__0_1.distcp")
    proc = train(tmp_path / "new", [f"checkpoint.init_from={source}"], cache_dir=data_cache,
                 check=False)
    _one_line_error(proc, "step_0000006 is damaged", "__0_1.distcp", "truncated")


@pytest.mark.slow
def test_all_checkpoints_damaged_refuses_to_resume(saved_run, data_cache, tmp_path):
    run_dir = _copy(saved_run, tmp_path)
    for step in ("step_0000004", "step_0000006"):
        (run_dir / "checkpoints" / step / "common.pt").write_bytes(b"junk")
    proc = train(run_dir, SAVE_EVERY_2, cache_dir=data_cache, extra=["--resume"], check=False)
    _one_line_error(proc, "no intact checkpoint", "moved aside")
    assert losses(run_dir) == losses(saved_run)  # metrics untouched


@pytest.mark.slow
@pytest.mark.parametrize("latest", ["garbage", "directory", "missing_step", "binary"])
def test_broken_latest_falls_back_to_the_newest_complete_checkpoint(latest, saved_run,
                                                                     tmp_path, caplog):
    root = _copy(saved_run, tmp_path) / "checkpoints"
    pointer = root / "latest"
    pointer.unlink()
    if latest == "directory":
        pointer.mkdir()
    elif latest == "binary":
        pointer.write_bytes(b"\xff\xfe\x00step")
    else:
        pointer.write_text("not a checkpoint\n" if latest == "garbage" else "step_0000099\n")
    assert ckpt.find_checkpoint(root.parent) == root / "step_0000006"
    assert ckpt.resume_candidates(root.parent) == [root / "step_0000006", root / "step_0000004"]
    assert "using the newest complete checkpoint" in caplog.text


@pytest.mark.slow
def test_model_that_does_not_fit_the_checkpoint_is_one_line(saved_run, data_cache, tmp_path):
    """Megatron's "Global shape mismatch" used to end a stack trace several screens long."""
    proc = train(tmp_path / "new", ["model.ffn_hidden_size=512",
                                    f"checkpoint.init_from={saved_run}"],
                 cache_dir=data_cache, check=False)
    _one_line_error(proc, "does not fit this model", "linear_fc1.weight", "config.yaml")


# --------------------------------------------------------------------------------------------
# non-finite steps

DIVERGE = ["optimizer.lr=1e30", "optimizer.min_lr=0", "checkpoint.save_interval=1"]


@pytest.mark.slow
def test_nonfinite_step_stops_the_run_before_anything_is_saved(data_cache, tmp_path):
    """lr=1e30 makes step 3's gradients infinite. It used to save NaN weights as `latest`,
    prune the good checkpoints and exit 0."""
    run_dir = tmp_path / "run"
    proc = train(run_dir, DIVERGE, cache_dir=data_cache, check=False)
    _one_line_error(proc, "step 3: non-finite", "optimizer.skip_nonfinite")
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000002"]
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert integrity.verify(root / "step_0000002")
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_the_last_finite_checkpoint_kept(data_cache,
                                                                                tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, [*DIVERGE, "optimizer.skip_nonfinite=10"], cache_dir=data_cache)
    logged = metrics(run_dir)
    assert [m.get("skipped", 0) for m in logged] == [0, 0, 1, 1, 1, 1]
    assert [m.get("nonfinite_skipped", 0) for m in logged] == [0, 0, 1, 2, 3, 4]
    root = run_dir / "checkpoints"
    # keep_last 2 keeps steps 5 and 6; step 2, the newest finite one, is never pruned
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000005",
                                                           "step_0000006"]
    assert json.loads((root / "step_0000006" / integrity.MANIFEST).read_text())["finite"] is False
    proc = train(run_dir, [*DIVERGE, "optimizer.skip_nonfinite=10", "schedule.train_steps=7"],
                 cache_dir=data_cache, extra=["--resume"], check=False)
    assert proc.returncode == 0 and metrics(run_dir)[-1]["nonfinite_skipped"] == 5


# --------------------------------------------------------------------------------------------
# one process per run directory


def _launch(run_dir: Path, data_cache: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_foresight", "train", str(TEST_RECIPE),
           f"data.cache_dir={data_cache}", "checkpoint.save_interval=1", "--run-dir",
           str(run_dir), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_second_trainer_on_a_run_dir_is_refused_and_the_first_loses_nothing(
        baseline_run, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    first = _launch(run_dir, data_cache)
    lock = run_dir / ".foresight.lock"
    _wait_for(lambda: lock.exists() and lock.read_text().strip())
    # paused while the second starts: a 6-step run can finish within the second's start-up
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = train(run_dir, ["checkpoint.save_interval=1"], cache_dir=data_cache,
                       extra=["--resume"], check=False)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _one_line_error(second, "is in use by", f"PID {first.pid}", "another --run-dir")
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert losses(run_dir) == losses(baseline_run)
    assert lock.read_text() == ""  # released on exit


@pytest.mark.slow
def test_stale_lock_of_a_dead_process_is_taken_over(data_cache, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / ".foresight.lock").write_text(json.dumps(
        {"host": os.uname().nodename, "pid": dead.pid, "command": "foresight train",
         "since": time.time() - 60}))
    proc = train(run_dir, ["schedule.train_steps=2"], cache_dir=data_cache)
    assert f"took over the lock left by PID {dead.pid}" in proc.stderr + proc.stdout
    assert "no longer running" in proc.stderr + proc.stdout


def test_run_dir_that_is_a_file_is_one_line(tmp_path):
    file = tmp_path / "run"
    file.write_text("not a directory")
    proc = foresight(["train", str(TEST_RECIPE), "--run-dir", str(file)], check=False)
    _one_line_error(proc, str(file), "is a file")


# --------------------------------------------------------------------------------------------
# a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 60 MiB tmpfs: room for one checkpoint of tiny-test (35 MiB), not for two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): "
                    f"{made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_during_save_says_so_and_keeps_the_last_checkpoint(small_disk, data_cache):
    """Torch used to report `unexpected pos 704 vs 598` from deep in its writer; now the save
    says the disk is full, removes its partial files, and the previous checkpoint loads."""
    run_dir = small_disk / "run"
    overrides = ["checkpoint.save_interval=1", "logging.tensorboard=false"]
    proc = train(run_dir, overrides, cache_dir=data_cache, check=False)
    _one_line_error(proc, "no space left on device", "step_0000002", "--resume")
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
    assert integrity.verify(root / "step_0000001")
    # resuming on the still-full disk fails the same clear way, and loses nothing
    proc = train(run_dir, overrides, cache_dir=data_cache, extra=["--resume"], check=False)
    _one_line_error(proc, "no space left on device")
    assert [m["step"] for m in metrics(run_dir)][:1] == [1]
    assert integrity.verify(root / "step_0000001")


# --------------------------------------------------------------------------------------------
# SIGKILL at random moments


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _steps_logged(run_dir: Path) -> int:
    """Complete lines in the run's metrics log (a line being written is not counted)."""
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(
        baseline_run, data_cache, tmp_path):
    """A run saving every step is killed with SIGKILL 4 times at random moments (fixed seed)
    once it has trained a step past where it resumed (so a kill lands mid-run however fast
    the machine), resumed after each; then it runs to the end. Losses equal the uninterrupted
    run's, every step is logged exactly once, and no process of a killed trainer outlives it."""
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    kills = 0
    for _ in range(4):
        before = _steps_logged(run_dir)
        if before == 6:
            break
        proc = _launch(run_dir, data_cache, "--resume")
        time.sleep(0.5)
        children = _descendants(proc.pid)
        deadline = time.monotonic() + 180
        while (_steps_logged(run_dir) == before and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))  # in the next step, its save, or between them
        children += _descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=120)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
    final = _launch(run_dir, data_cache, "--resume")
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out[-3000:]
    assert kills >= 2
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert losses(run_dir) == losses(baseline_run)


# Megatron's save, reduced to how it waits for the writers it forks: the trainer sits in
# JoinableQueue.join() while a writer works; a writer that finishes after the trainer died calls
# task_done(), whose notify_all() waits for the dead waiter to wake, forever.
_WRITER_WAIT = """
import multiprocessing as mp, sys, time
from megatron_foresight.runtime.lifetime import forked_children_die_with_this_process

def write(done):
    time.sleep(3.0)  # the writer still writing when the trainer is killed
    done.get()
    done.task_done()

if __name__ == "__main__":
    forked_children_die_with_this_process()
    ctx = mp.get_context("fork")
    done = ctx.JoinableQueue()
    done.put(0)
    writer = ctx.Process(target=write, args=(done,))
    writer.start()
    print(writer.pid, flush=True)
    done.join()
"""


def test_a_forked_checkpoint_writer_dies_with_a_killed_trainer(tmp_path):
    """CI once waited 120 s for a killed trainer's output to end: one of Megatron's forked
    checkpoint writers outlived it, hung in task_done(). Forked children now die with it."""
    script = tmp_path / "trainer.py"
    script.write_text(_WRITER_WAIT)
    trainer = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    writer = psutil.Process(int(trainer.stdout.readline()))
    time.sleep(0.5)
    assert trainer.poll() is None and writer.is_running()  # the trainer waits in join()
    trainer.kill()
    trainer.wait(10)
    gone, alive = psutil.wait_procs([writer], timeout=10)
    for hung in alive:
        hung.kill()
    assert gone, "the writer outlived its trainer"


def test_a_run_on_a_read_only_store_is_read_without_the_lock(tmp_path, monkeypatch, caplog):
    """Converting from a read-only model store must not fail for want of a lock file; a
    command that writes into the run still needs it."""
    from megatron_foresight.runtime import run_lock

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)

    def read_only(*_args, **_kw):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(run_lock.os, "open", read_only)
    run_lock.hold_run_of(run_dir / "checkpoints", "foresight convert to-hf", reading=True)
    assert "reading it without the lock" in caplog.text
    with pytest.raises(OSError):
        run_lock.hold_run_of(run_dir / "checkpoints", "foresight eval")
