"""`foresight pipeline` through the real command line: WM-AMT -> FE-SFT -> FC-RL -> evaluation
on a small world, each stage from the previous stage's checkpoint (slow). A plumbing test at a
budget too small to learn anything: it checks the chain of checkpoints, the report, and that a
second call continues instead of starting over."""

import json

import pytest

from megatron_foresight.pipeline import REPORT_METRICS, STAGES
from helpers.run import REPO, TINY_STAGES as TINY, foresight


@pytest.mark.slow
def test_pipeline_chains_the_stages_and_writes_the_report(small_world, tmp_path):
    run_dir = tmp_path / "pipe"
    args = ["pipeline", str(REPO / "recipes" / "tiny-cpu"), "--run-dir", str(run_dir),
            "--tasks", "2", f"data.world={small_world}", f"data.cache_dir={tmp_path / 'cache'}",
            *TINY]
    proc = foresight(args)
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report) == list(STAGES)
    assert all(list(report[s]) == list(REPORT_METRICS) for s in STAGES)
    assert f"report: {run_dir / 'report.json'}" in proc.stdout
    for previous, stage in zip(STAGES, STAGES[1:]):  # each stage started from the one before
        config = (run_dir / stage / "config.yaml").read_text()
        assert f"init_from: {run_dir / previous}" in config
    assert (run_dir / "fc_rl" / "checkpoints" / "latest").exists()
    # FC-RL does not replay the validation tasks that the pipeline's evaluations play
    assert "validation_tasks: 0" in (run_dir / "fc_rl" / "config.yaml").read_text()
    evaluated = json.loads((run_dir / "eval_fc_rl.json").read_text())["metrics"]
    assert "val/reward/total" in evaluated  # scored on the evaluation's own episodes
    # a second call finds every stage done and every evaluation written
    again = foresight(args)
    assert "already trained to step 2 of 2" in again.stdout + again.stderr
    assert json.loads((run_dir / "report.json").read_text()) == report
