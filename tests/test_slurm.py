"""The Slurm scripts: every script asks for what its recipe is laid out for, and on a real
single-node Slurm cluster `sbatch slurm/tiny_cpu.sh` trains through the shared launcher, saves
on the time-limit signal, requeues itself and resumes from its checkpoint."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_foresight.config import load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, free_port, missing_programs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*_*.sh"))


def _headers(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.M))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_each_script_requests_what_its_recipe_is_laid_out_for(script):
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert 'exec "${SLURM_SUBMIT_DIR:-.}/slurm/launch.sh"' in text  # one launcher for all
    h = _headers(script)
    assert "#SBATCH --requeue" in text
    assert re.search(r"#SBATCH --signal=B:USR1@\d+", text)
    if script.name == "tiny_cpu.sh":
        assert h["ntasks-per-node"] == "2"
        return
    stage, size = script.stem.rsplit("_", 1)
    recipe = ROOT / "recipes" / size / f"{stage}.yaml"
    assert f"recipes/{size}/{stage}.yaml" in text and recipe.exists()
    launch = load_recipe(recipe).launch
    assert h["job-name"] == script.stem  # also the run directory, so fe_sft finds wm_amt's run
    assert int(h["nodes"]) == launch.nodes
    assert int(h["ntasks-per-node"]) == int(h["gpus-per-node"]) == launch.gpus_per_node


def test_every_stage_and_size_has_a_script():
    names = {s.stem for s in SCRIPTS}
    for size in ("1b", "8b", "70b"):
        for stage in ("wm_amt", "fe_sft", "fc_rl"):
            assert f"{stage}_{size}" in names
    assert "tiny_cpu" in names


def test_launcher_refuses_a_missing_recipe(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "slurm/launch.sh"), "recipes/nope.yaml"],
                       env={**os.environ, "PROJECT_DIR": str(ROOT)}, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "recipe recipes/nope.yaml not found" in r.stderr


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_programs()
    if missing:
        pytest.skip(f"Slurm is not installed here (missing {', '.join(missing)}); "
                    "`apt-get install slurmctld slurmd slurm-client` (.ci/run does) to run it")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.mark.slow
def test_sbatch_tiny_cpu_trains_saves_on_the_time_limit_signal_and_resumes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    env = {**slurm.env, "RUN_DIR": str(run_dir), "MASTER_PORT": str(free_port()),
           "FORESIGHT": str(Path(sys.executable).parent / "foresight"),
           "RUNS_DIR": str(tmp_path)}
    steps = 30
    out = tmp_path / "job-%j.out"
    job = slurm.run("sbatch", "--parsable", f"--output={out}", "slurm/tiny_cpu.sh",
                    f"schedule.train_steps={steps}", "checkpoint.save_interval=2",
                    "schedule.eval_interval=0", "logging.log_interval=1",
                    env=env, cwd=ROOT).stdout.strip()
    # Wait for the first checkpoint, then send what Slurm sends before the time limit
    # (--signal=B:USR1@60): the signal to the batch shell, i.e. the launcher.
    first = run_dir / "checkpoints" / "step_0000002"
    deadline = time.time() + 300
    while not first.exists():
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING"), f"job {job} {state}:\n{_output(out, job)}"
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.5)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    # The launcher has the tasks save and stop, then requeues the job.
    # While the requeue tears the first run down, scontrol may briefly report a terminal state
    # (FAILED: the batch shell is killed "DUE TO JOB REQUEUE"); wait until the job is pending
    # or running again before waiting for its end.
    deadline = time.time() + 180
    while True:
        info = slurm.job(job)
        if info.get("Restarts") == "1" and info.get("JobState") in ("PENDING", "RUNNING"):
            break
        assert time.time() < deadline, f"job {job} was not requeued:\n{_output(out, job)}"
        time.sleep(0.5)
    # Not started early: slurmd refuses to relaunch a job id it has just killed ("Job 1 already
    # killed, do not launch batch job") and the job FAILS; Slurm's own hold after a requeue
    # (AuthInfo=cred_expire, 10 s on this test cluster, 120 s by default) avoids that.
    info = slurm.wait(job, timeout=600, settle=20)
    text = _output(out, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", \
        f"{ {k: info.get(k) for k in ('JobState', 'Restarts', 'Reason', 'ExitCode')} }\n{text}"
    assert "fits in" in text                                   # the planner ran first
    assert "restart 0" in text and "restart 1" in text
    assert f"requeueing job {job}" in text
    log = (run_dir / "logs" / f"tiny_cpu-{job}.log").read_text()
    stopped = int(re.search(r"stopped at step (\d+) of", log).group(1))
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:07d} at step {stopped}" in log
    assert 2 <= stopped < steps
    assert (run_dir / "checkpoints" / f"step_{steps:07d}").is_dir()
    logged = [json.loads(line)["step"] for line in
              (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == list(range(1, steps + 1))  # no step lost, none repeated
    assert len(logged) == steps


def _output(pattern: Path, job: str) -> str:
    path = Path(str(pattern).replace("%j", job))
    return path.read_text() if path.exists() else f"(no output file {path})"
