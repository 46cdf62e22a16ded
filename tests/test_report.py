"""`foresight report` built from real tiny runs (slow): `foresight eval --out` of the medium
FE-SFT policy writes its episodes and its own report; a 2-step FC-RL run from that policy gives
FC-RL curves with validation points; the medium WM-AMT run gives supervised curves. The figures
are checked as matplotlib objects, the reliability bins against scores.py's ECE, the page in a
real headless Chromium; and a W&B offline run of a real run's scalars."""

import json
import re
import shutil
import subprocess
import time

import pytest

from megatron_foresight.eval.report import write_report
from megatron_foresight.eval.report_figures import BINS, FC_RL_PANELS, value_pairs
from megatron_foresight.foresight.scores import expected_calibration_error
from helpers.run import REPO, foresight, metrics, train

FE_SFT = REPO / "recipes" / "tiny-cpu" / "fe_sft.yaml"
FC_RL = REPO / "recipes" / "tiny-cpu" / "fc_rl.yaml"
TASKS = 8

# The first test to need the trained FE-SFT policy may pay for it (~4 min, shared with
# tests/test_stages_e2e.py): pytest-timeout counts fixture set-up against that test.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def evaluated(medium_world, medium_cache, medium_fe_sft, tmp_path_factory):
    """`foresight eval --out` of the medium FE-SFT policy on TASKS validation tasks."""
    out = tmp_path_factory.mktemp("report-eval") / "eval_fe_sft.json"
    foresight(["eval", str(FE_SFT), f"data.world={medium_world}",
               f"data.cache_dir={medium_cache}", "data.seq_length=768", "--ckpt",
               str(medium_fe_sft), "--tasks", str(TASKS), "--max-new-tokens", "200",
               "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def fc_rl_run(medium_world, medium_cache, medium_fe_sft, tmp_path_factory):
    """FC-RL for 2 steps from the FE-SFT policy, validating (2 tasks) at the start and after
    each step, so its curves have validation points."""
    run_dir = tmp_path_factory.mktemp("report-fc-rl") / "fc_rl"
    foresight(["train", str(FC_RL), f"data.world={medium_world}",
               f"data.cache_dir={medium_cache}", "schedule.train_steps=2",
               "schedule.eval_interval=1", "fc_rl.validation_tasks=2", "fc_rl.prompts_per_step=2",
               "fc_rl.group_size=2", "fc_rl.max_new_tokens=64", "schedule.global_batch_size=4",
               "schedule.micro_batch_size=2", "checkpoint.save_interval=0",
               "logging.tensorboard=false", f"checkpoint.init_from={medium_fe_sft}",
               "--run-dir", str(run_dir)])
    return run_dir


@pytest.fixture(scope="module")
def report(evaluated, fc_rl_run, medium_wm_amt, tmp_path_factory):
    """The report of the evaluation, the FC-RL run and the WM-AMT run given twice (two links
    with their own names: two runs on the same axes)."""
    links = tmp_path_factory.mktemp("report-links")
    for name in ("wm_a", "wm_b"):
        (links / name).symlink_to(medium_wm_amt)
    return write_report([evaluated, fc_rl_run, links / "wm_a", links / "wm_b"],
                        tmp_path_factory.mktemp("report") / "out")


@pytest.mark.slow
def test_eval_out_writes_its_report_with_episodes(evaluated):
    out = evaluated.with_suffix(".report")
    assert {"index.html", "metrics.md", "reliability.png", "value.png", "fidelity.png",
            "curves_fe_sft.png"} <= {p.name for p in out.iterdir()}
    page = (out / "index.html").read_text()
    assert page.count("<details open>") == 3  # the viewer's sampled episodes
    for shown in ("plan", "rollout", "value", "what really came", "calibration", "fidelity"):
        assert shown in page


@pytest.mark.slow
def test_report_files_and_metrics_table(report, evaluated):
    names = {p.name for p in report.out.iterdir()}
    assert {"index.html", "metrics.md", "reliability.png", "value.png", "fidelity.png",
            "curves_fe_sft.png", "curves_fc_rl.png", "curves_wm_amt.png"} <= names
    table = (report.out / "metrics.md").read_text().splitlines()
    assert table[0].startswith("| run | stage | episodes | task_success |")
    evaluation = json.loads(evaluated.read_text())["metrics"]
    row = next(line for line in table if line.startswith("| eval_fe_sft |"))
    assert f"| {TASKS} |" in row and f"{evaluation['value_ece']:.3f}" in row
    page = (report.out / "index.html").read_text()
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched
    assert len(re.findall(r'<img src="(\w+)\.png"', page)) == len(report.figures)


@pytest.mark.slow
def test_reliability_bins_agree_with_scores_ece(report, evaluated):
    part = next(p for p in report.parts if p.run == "eval_fe_sft")
    values, outcomes = value_pairs(part)
    assert values, "the FE-SFT policy wrote no readable <value>"
    fig = report.figures["reliability"]
    top, bottom = fig.axes
    (curve,) = [line for line in top.get_lines() if line.get_label().startswith("eval_fe_sft")]
    counts = [bar.get_height() for bar in bottom.patches]
    means, rates = curve.get_xdata(), curve.get_ydata()
    ece = sum(n * abs(v - y) for v, y, n in zip(means, rates, counts)) / sum(counts)
    evaluation = json.loads(evaluated.read_text())["metrics"]
    assert ece == pytest.approx(evaluation["value_ece"], abs=1e-9)
    assert ece == pytest.approx(expected_calibration_error(values, outcomes, BINS))
    assert sum(counts) == len(values)
    assert f"ECE {evaluation['value_ece']:.3f}" in curve.get_label()
    assert f"Brier {evaluation['value_brier']:.3f}" in curve.get_label()
    assert [line.get_label() for line in top.get_lines()][0] == "perfect calibration"
    assert top.get_xlabel() == "" and bottom.get_xlabel().startswith("<value>")
    assert top.get_ylabel() == "success rate" and bottom.get_ylabel() == "turns per bin"


@pytest.mark.slow
def test_value_and_fidelity_figures(report, evaluated):
    hist, roc = report.figures["value"].axes
    assert len(hist.patches) == 2  # one step histogram per outcome
    assert {p.get_label().split(": ")[1].split(" ")[0] for p in hist.patches} == \
        {"success", "failure"}
    auroc = json.loads(evaluated.read_text())["metrics"]["value_auroc"]
    (curve,) = [line for line in roc.get_lines() if line.get_label().startswith("eval_fe_sft")]
    assert ("n/a" if auroc is None else f"AUROC {auroc:.3f}") in curve.get_label()
    assert roc.get_xlabel() == "false positive rate"
    (ax,) = report.figures["fidelity"].axes
    sets = {t.get_text().split("\n")[1].split(" ")[0] for t in ax.get_xticklabels()}
    assert sets and sets <= {"search", "math"}
    assert ax.get_ylabel() == "rollout fidelity (token F1)"


@pytest.mark.slow
def test_learning_curves_mark_validation_and_label_runs(report, fc_rl_run):
    fc_rl = report.figures["curves_fc_rl"]
    titles = [ax.get_title() for ax in fc_rl.axes if ax.get_visible()]
    logged = {k for r in metrics(fc_rl_run) for k in r}
    assert "reward components" in titles and "format validity" in titles
    rewards = fc_rl.axes[titles.index("reward components")]
    components = {k for k in logged if k.startswith("reward/")}
    assert len([ln for ln in rewards.get_lines() if "(val)" not in ln.get_label()]) == \
        len(components)
    validated = [ln for ln in rewards.get_lines() if "(val)" in ln.get_label()]
    assert validated and all(ln.get_marker() == "D" for ln in validated)
    assert len(validated[0].get_xdata()) == 3  # at the start and after each of the 2 steps
    assert len(titles) == sum(any(any(re.fullmatch(p.replace("*", ".*"), k) for k in logged)
                                  for p in (*pl.train, *pl.val)) for pl in FC_RL_PANELS)
    wm = report.figures["curves_wm_amt"]
    loss = wm.axes[0]
    assert loss.get_title() == "loss: all weighted tokens" and loss.get_xlabel() == "step"
    assert {ln.get_label().removesuffix(" (val)") for ln in loss.get_lines()} == {"wm_a", "wm_b"}


def test_report_command_draws_a_training_runs_curves(baseline_run, tmp_path):
    proc = foresight(["report", str(baseline_run), "--out", str(tmp_path / "r")])
    assert proc.stdout.strip() == str(tmp_path / "r" / "index.html")
    assert {p.name for p in (tmp_path / "r").iterdir()} == {
        "index.html", "metrics.md", "curves_lm.png"}  # no episodes: no calibration figures


def test_report_of_a_missing_run_is_one_line(tmp_path):
    proc = foresight(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")],
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: no such run directory or " \
                                  "evaluation file"


def test_pipeline_names_each_stage_a_wandb_run_in_one_group(tmp_path):
    from megatron_foresight.pipeline import _stage_overrides

    recipe = REPO / "recipes" / "tiny-cpu" / "fe_sft.yaml"
    named = _stage_overrides(recipe, "fe_sft", ["logging.wandb_project=p"], 0, tmp_path / "abl")
    assert named[-2:] == ["logging.wandb_group=abl", "logging.wandb_run_name=fe_sft"]
    kept = _stage_overrides(recipe, "fe_sft", ["logging.wandb_project=p",
                                               "logging.wandb_run_name=mine"], 0, tmp_path)
    assert not any(o.startswith("logging.wandb_run_name=fe_sft") for o in kept)
    assert _stage_overrides(recipe, "fe_sft", [], 0, tmp_path) == []


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_page_renders_in_headless_chromium(report, tmp_path):
    """Every image loads and nothing is logged to the console: a copy of the page with a
    load-time check (the report itself has no script) is opened headless; a screenshot of the
    page itself is kept in the test's directory."""
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium not installed (apt-get install chromium): page not rendered")
    probe = report.out / "probe.html"
    probe.write_text((report.out / "index.html").read_text().replace(
        "</body>", "<script>addEventListener('load', () => document.body.setAttribute("
        "'data-loaded', [...document.images].filter(i => i.naturalWidth > 0).length))"
        "</script></body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
             "--v=0", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert f'data-loaded="{len(report.figures)}"' in dom.stdout, dom.stderr[-3000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1280,4000", f"--screenshot={shot}",
                    (report.out / "index.html").as_uri()], capture_output=True, timeout=120,
                   check=True)
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_wandb_offline_run_holds_the_scalars(medium_wm_amt, tmp_path, monkeypatch):
    """A W&B offline run fed the records of a real run (as training feeds its writer) holds
    the same scalars TensorBoard gets."""
    pytest.importorskip("wandb", reason="wandb not installed (pip install -e .[wandb])")
    from megatron_foresight.runtime.log import MetricsWriter, WandbSettings

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = metrics(medium_wm_amt)
    writer = MetricsWriter(tmp_path, tensorboard=False,
                           wandb=WandbSettings("foresight-test", name="wm", group="tests"))
    for record in records:
        writer.write(record["step"], {k: v for k, v in record.items() if k != "step"})
    writer.close()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = _offline_history(run_dir)
    assert [h["_step"] for h in history] == [r["step"] for r in records]
    for logged, record in zip(history, records):
        scalars = {k: v for k, v in record.items() if k != "step"}
        assert "loss/observation" in scalars
        assert {k: logged[k] for k in scalars} == pytest.approx(scalars)


@pytest.mark.slow
def test_training_logs_to_a_wandb_offline_run(data_cache, tmp_path):
    """A tiny training with `logging.wandb_project` and WANDB_MODE=offline: its offline W&B
    run holds every scalar of metrics.jsonl at its step, and the run's name and group."""
    pytest.importorskip("wandb", reason="wandb not installed (pip install -e .[wandb])")
    run_dir = tmp_path / "run"
    train(run_dir, ["schedule.train_steps=2", "logging.tensorboard=false",
                    "logging.wandb_project=foresight-test", "logging.wandb_group=tests"],
          cache_dir=data_cache, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    records = metrics(run_dir)
    history = _offline_history(offline)
    assert [h["_step"] for h in history] == [r["step"] for r in records]
    for logged, record in zip(history, records):
        scalars = {k: v for k, v in record.items() if k != "step"}
        assert {k: logged[k] for k in scalars} == pytest.approx(scalars)


def _offline_history(run_dir, wait_s: float = 60.0) -> list[dict]:
    """The history rows of an offline run, read from its .wandb file: W&B's record log (a
    7-byte file header, then 32 KiB blocks of records, each a 7-byte header of checksum,
    length and type, a protobuf split over blocks as FIRST / MIDDLE / LAST pieces).
    `run.finish()` returns before W&B's service process has written the log's last records
    (CI once read it with no history yet): read it once its `exit` record is there."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        records = []
        try:
            for data in _log_records(path.read_bytes()):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(data)
                records.append(record)
        except DecodeError:  # a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{path}: no exit record after {wait_s:.0f} s"
        time.sleep(0.2)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def _log_records(raw: bytes, block: int = 32768):
    assert raw[:4] == b":W&B", "not a W&B run log"
    pos, pieces = 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        if kind == 0:
            break
        pieces += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            yield pieces
            pieces = b""
