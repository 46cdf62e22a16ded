"""`foresight experiment`: the ablation's rows over seeds. Its statistics and the recipes of
its steps are checked directly; a CI-sized run of the real command line (2 rows, 2 seeds, a
budget too small to learn anything) checks the table's structure, that rows share the runs
they should (counted from what the command records it trained) and that a second call
continues instead of training again."""

import json
import math
import os

import pytest
import yaml

from megatron_foresight.configtree import ConfigError
from megatron_foresight.config import load_recipe
from megatron_foresight.errors import UsageError
from megatron_foresight.experiment import (
    ROWS, Experiment, _stage_defaults, format_summary, mean_interval, parse_rows, row_metrics,
    summarize, t975,
)
from megatron_foresight.foresight.format import AgentTurn
from megatron_foresight.foresight.formats import FORMATS
from megatron_foresight.pipeline import (
    REPORT_METRICS, Stopped, for_stage, read_evaluation, train_to_end,
)
from helpers.run import REPO, TINY_STAGES, foresight

TINY_CPU = REPO / "recipes" / "tiny-cpu"


def test_mean_interval_is_the_t_interval():
    stat = mean_interval([0.2, 0.4, None, 0.9])
    xs = [0.2, 0.4, 0.9]
    mean = sum(xs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(mean)
    assert stat["sd"] == pytest.approx(sd)
    assert stat["high"] - stat["mean"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert mean_interval([None, None])["mean"] is None
    assert mean_interval([0.5])["low"] is None  # one value: no interval
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert t975(31) == pytest.approx(2.0395, abs=1e-4)  # beyond the table: Cornish-Fisher
    assert t975(40) == pytest.approx(2.0211, abs=1e-4)
    assert t975(120) == pytest.approx(1.9799, abs=1e-4)


def _per_seed(a_success, b_success):
    rows = {}
    for seed, (a, b) in enumerate(zip(a_success, b_success)):
        base = {m: None for m in REPORT_METRICS}
        rows[seed] = {"wm_amt+fe_sft": {**base, "task_success": a},
                      "fe_sft": {**base, "task_success": b}}
    return rows


def test_orderings_are_tested_on_paired_differences():
    rows = [r for r in ROWS if r.key in ("fe_sft", "wm_amt+fe_sft")]
    # a beats b by 0.1 on every seed although the seeds differ a lot: paired, it holds
    held = summarize(_per_seed([0.2, 0.5, 0.8], [0.1, 0.4, 0.7]), rows)
    (claim,) = held["orderings"]
    assert claim["claim"] == "WM-AMT + FE-SFT > FE-SFT"
    assert claim["tests"]["task_success"]["mean"] == pytest.approx(0.1)
    assert claim["tests"]["task_success"]["verdict"] == "holds"
    assert "rollout_fidelity" not in claim["tests"]  # undefined on both rows
    mixed = summarize(_per_seed([0.3, 0.5, 0.7], [0.4, 0.4, 0.6]), rows)
    assert mixed["orderings"][0]["tests"]["task_success"]["verdict"].startswith("not resolved")
    worse = summarize(_per_seed([0.1, 0.4, 0.7], [0.2, 0.5, 0.8]), rows)
    assert worse["orderings"][0]["tests"]["task_success"]["verdict"] == "reversed"
    # "FE-SFT no better than SFT": shown only when FE-SFT is worse; a tie is not a proof
    no_better = [r for r in ROWS if r.key in ("fe_sft", "sft")]
    tie = {s: {"fe_sft": {**row["fe_sft"]}, "sft": {**row["wm_amt+fe_sft"]}}
           for s, row in _per_seed([0.3, 0.5, 0.7], [0.4, 0.4, 0.6]).items()}
    verdict = summarize(tie, no_better)["orderings"][0]["tests"]["task_success"]["verdict"]
    assert verdict.startswith("consistent (interval spans 0")
    table = format_summary(held)
    assert "| WM-AMT + FE-SFT | 0.500 [" in table and "| holds |" in table
    assert "by task set" not in table  # no evaluation named a set


def test_each_task_sets_success_is_a_column_and_tested_paired():
    """The paper's figures are search only: each set's success (`search/task_success` in an
    evaluation) gets its own column and its own paired test, next to the overall success."""
    evaluation = {"task_success": 0.3, "value_brier": 0.2, "search/task_success": 0.5,
                  "search/f1": 0.6, "math/task_success": 0.1, "math/value_brier": 0.3}
    kept = row_metrics(evaluation)
    assert list(kept) == [*REPORT_METRICS, "search/task_success", "math/task_success"]
    assert kept["search/task_success"] == 0.5 and kept["format_validity"] is None
    rows = [r for r in ROWS if r.key in ("fe_sft", "wm_amt+fe_sft")]
    per_seed = _per_seed([0.2, 0.5, 0.8], [0.25, 0.45, 0.85])  # overall: not resolved
    for seed, (a, b) in enumerate([(0.4, 0.1), (0.6, 0.2), (0.9, 0.7)]):
        per_seed[seed]["wm_amt+fe_sft"]["search/task_success"] = a
        per_seed[seed]["fe_sft"]["search/task_success"] = b
    summary = summarize(per_seed, rows)
    assert summary["task_sets"] == ["search/task_success"]
    assert summary["rows"]["fe_sft"]["search/task_success"]["mean"] == pytest.approx(1 / 3)
    tests = summary["orderings"][0]["tests"]
    assert list(tests) == ["task_success", "search/task_success"]
    assert tests["task_success"]["verdict"].startswith("not resolved")
    assert tests["search/task_success"]["mean"] == pytest.approx(0.3)
    assert tests["search/task_success"]["verdict"] == "holds"  # 0.3, 0.4, 0.2 on the seeds
    table = format_summary(summary)
    assert "Success by task set:\n\n| row | search/task_success |" in table
    assert "| FE-SFT | 0.333 [" in table
    assert "| WM-AMT + FE-SFT > FE-SFT | search/task_success | 0.300 [" in table
    # a set one row lacks (an older evaluation) is left out of that row's mean, not an error
    del per_seed[0]["fe_sft"]["search/task_success"]
    assert summarize(per_seed, rows)["rows"]["fe_sft"]["search/task_success"]["n"] == 2


def test_rows_are_named_and_unknown_rows_refused():
    assert [r.key for r in parse_rows("fe_sft, wm_amt+fe_sft,fe_sft")] == \
        ["fe_sft", "wm_amt+fe_sft"]
    assert len(parse_rows(None)) == 6
    with pytest.raises(UsageError, match="unknown row.*wm_amt\\+fc_rl.*the rows are sft"):
        parse_rows("wm_amt+fc_rl")


def test_step_recipes_format_free_sft_plain_rl_and_shared_prefixes(tmp_path):
    exp = Experiment(TINY_CPU, tmp_path, [7], ROWS, tasks=4)
    sft = exp.config(7, ("sft",))
    assert sft.stage == "fe_sft" and sft.seed == 7 and sft.foresight_format == "none"
    assert sft.stage_config.sources == ["world:train"] and sft.stage_config.weights == [1.0]
    assert sft.stage_config.valid_sources == ["world:validation"]
    assert set(sft.stage_config.segment_weights) == {"think", "action"}
    assert sft.checkpoint.init_from is None  # the WM-AMT recipe's start: fresh weights
    fe = exp.config(7, ("wm_amt", "fe_sft"))
    assert fe.foresight_format == "v1" and fe.checkpoint.init_from == str(tmp_path / "seed7" /
                                                                          "wm_amt")
    plain = exp.config(7, ("wm_amt", "fe_sft", "rl"))
    assert plain.stage_config.reward_weights == {"task": 1.0, "format": 0.5}
    full = exp.config(7, ("wm_amt", "fe_sft", "fc_rl"))
    assert set(full.stage_config.reward_weights) == {"task", "calibration", "fidelity", "format"}
    assert plain.checkpoint.init_from == full.checkpoint.init_from == \
        str(tmp_path / "seed7" / "wm_amt+fe_sft")


def test_overrides_addressed_to_the_sft_or_rl_step_reach_that_step_alone(tmp_path):
    """`sft:` and `rl:` reach the step that runs another stage's recipe, not that stage
    (format-free SFT at its own budget); `fe_sft:` still reaches both."""
    exp = Experiment(TINY_CPU, tmp_path, [7], ROWS, tasks=4, overrides=[
        "sft:schedule.train_steps=240", "sft:schedule.anneal_steps=40",
        "rl:fc_rl.group_size=2", "fe_sft:schedule.eval_interval=60"])
    fe_steps = load_recipe(TINY_CPU / "fe_sft.yaml").schedule.train_steps
    assert fe_steps != 240
    for chain in (("sft",), ("wm_amt", "sft")):
        sft = exp.config(7, chain)
        assert (sft.schedule.train_steps, sft.schedule.anneal_steps) == (240, 40)
        assert sft.schedule.eval_interval == 60 and sft.foresight_format == "none"
    for chain in (("fe_sft",), ("wm_amt", "fe_sft")):
        fe = exp.config(7, chain)
        assert fe.schedule.train_steps == fe_steps and fe.schedule.eval_interval == 60
    fc_rl = load_recipe(TINY_CPU / "fc_rl.yaml").stage_config.group_size
    assert fc_rl != 2
    assert exp.config(7, ("wm_amt", "fe_sft", "rl")).stage_config.group_size == 2
    assert exp.config(7, ("wm_amt", "fe_sft", "fc_rl")).stage_config.group_size == fc_rl
    assert exp.config(7, ("wm_amt",)).schedule.train_steps == \
        load_recipe(TINY_CPU / "wm_amt.yaml").schedule.train_steps
    undone = Experiment(TINY_CPU, tmp_path, [7], ROWS, tasks=4,
                        overrides=['rl:fc_rl.reward_weights={"task": 1.0, "fidelity": 1.0}'])
    with pytest.raises(UsageError, match="the rl step would no longer be its row: "
                                         "fc_rl.reward_weights weighs fidelity"):
        undone.config(7, ("wm_amt", "fe_sft", "rl"))
    assert undone.config(7, ("wm_amt", "fe_sft", "fc_rl")).stage_config.reward_weights
    with pytest.raises(UsageError, match="the sft step would no longer be its row"):
        Experiment(TINY_CPU, tmp_path, [7], ROWS, tasks=4,
                   overrides=["sft:foresight_format=v1"]).config(7, ("sft",))
    with pytest.raises(UsageError, match="sft:seed=3: the experiment sets each run's seed"):
        Experiment(TINY_CPU, tmp_path, [7], ROWS, tasks=4, overrides=["sft:seed=3"])
    with pytest.raises(ConfigError, match="train_step"):  # a misspelt key is still refused
        Experiment(TINY_CPU, tmp_path, [7], ROWS, tasks=4,
                   overrides=["sft:schedule.train_step=240"]).config(7, ("sft",))


def test_the_command_takes_a_step_override_and_refuses_its_misspelt_key(tmp_path):
    """From the command line an `sft:` override reaches the recipes' checks (a misspelt key is
    refused naming it, before anything trains), not the stage-prefix check."""
    proc = foresight(["experiment", str(TINY_CPU), "--run-dir", str(tmp_path / "exp"),
                      "sft:schedule.train_step=325"], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "schedule.train_step" in proc.stderr and "not a stage" not in proc.stderr
    assert not (tmp_path / "exp" / "runs.jsonl").exists()


def test_overrides_addressed_to_a_stage_reach_only_that_stage():
    overrides = ["data.world=/w", "fe_sft:schedule.train_steps=150", "fc_rl.group_size=2",
                 "fe_sft.sources=[foresight:world:train]"]
    assert for_stage(overrides, "fe_sft", tasks=0) == [
        "data.world=/w", "schedule.train_steps=150", "fe_sft.sources=[foresight:world:train]"]
    assert for_stage(overrides, "wm_amt", tasks=0) == ["data.world=/w"]
    assert for_stage(overrides, "fc_rl", tasks=0) == ["data.world=/w", "fc_rl.group_size=2"]
    assert for_stage(["data.world=/a:b"], "wm_amt", tasks=0) == ["data.world=/a:b"]
    with pytest.raises(UsageError, match="'sft' is not a stage.*FE-SFT's recipe"):
        for_stage(["sft:schedule.train_steps=3"], "fe_sft")
    with pytest.raises(UsageError, match="sets each run's seed itself"):
        Experiment(TINY_CPU, "/tmp/unused", [7], ROWS, 4, ["fe_sft:seed=3"])
    exp = Experiment(TINY_CPU, "/tmp/unused", [7], ROWS, 4, ["fe_sft:schedule.train_steps=150"])
    assert exp.config(7, ("sft",)).schedule.train_steps == 150  # SFT runs FE-SFT's recipe
    recipe_steps = load_recipe(TINY_CPU / "wm_amt.yaml", []).schedule.train_steps
    assert exp.config(7, ("wm_amt",)).schedule.train_steps == recipe_steps != 150


def test_format_none_reads_bare_turns_and_refuses_foresight_only_parts():
    plain = FORMATS["none"]
    assert plain.prompt("Question: q") == "Question: q"
    turn = plain.parse_turn("<think>look it up</think>\n<search>Olgar founded</search>")
    assert isinstance(turn, AgentTurn) and turn.foresight is None
    assert not isinstance(FORMATS["v1"].parse_turn("<search>Olgar</search>"), AgentTurn)
    lenient = plain.parse_turn_lenient("<search>Olgar")
    assert lenient.action is None and "never closed" in lenient.errors[0].message
    with pytest.raises(ConfigError, match="fe_sft.sources.*foresight:world:train"):
        load_recipe(TINY_CPU / "fe_sft.yaml", ["foresight_format=none"])
    with pytest.raises(ConfigError, match="fc_rl.reward_weights.*calibration, fidelity"):
        load_recipe(TINY_CPU / "fc_rl.yaml", ["foresight_format=none"])


@pytest.mark.slow
def test_experiment_smoke_two_rows_two_seeds_shares_runs(small_world, tmp_path):
    run_dir = tmp_path / "exp"
    args = ["experiment", str(TINY_CPU), "--run-dir", str(run_dir), "--seeds", "2",
            "--rows", "wm_amt+fe_sft,wm_amt+fe_sft+rl", "--tasks", "2",
            f"data.world={small_world}", f"data.cache_dir={tmp_path / 'cache'}", *TINY_STAGES]
    proc = foresight(args)
    summary = json.loads((run_dir / "experiment.json").read_text())
    assert summary["seeds"] == [1234, 1235]
    assert list(summary["rows"]) == ["wm_amt+fe_sft", "wm_amt+fe_sft+rl"]
    sets = summary["task_sets"]
    for stats in summary["rows"].values():
        assert set(stats) == {"label", *REPORT_METRICS, *sets}
        for metric in (*REPORT_METRICS, *sets):
            assert set(stats[metric]) == {"n", "mean", "sd", "low", "high"}
    for seed in ("1234", "1235"):
        for row in ("wm_amt+fe_sft", "wm_amt+fe_sft+rl"):
            evaluated = json.loads((run_dir / f"seed{seed}" / f"eval_{row}.json").read_text())
            played = [k for k in evaluated["metrics"] if k.endswith("/task_success")]
            assert played and set(played) <= set(sets)
            assert summary["per_seed"][seed][row] == {
                **{m: evaluated["metrics"].get(m) for m in REPORT_METRICS},
                **{k: evaluated["metrics"][k] for k in played}}
    assert "| WM-AMT + FE-SFT + RL |" in (run_dir / "experiment.md").read_text()
    assert (run_dir / "experiment.png").stat().st_size > 0
    assert "table: " in proc.stdout
    # counted: 5 chain steps over 2 rows, but each seed trains WM-AMT and FE-SFT once
    ledger = [json.loads(line) for line in (run_dir / "runs.jsonl").read_text().splitlines()]
    trained = [e["train"] for e in ledger if "train" in e]
    assert sorted(trained) == sorted(f"seed{s}/{c}" for s in (1234, 1235)
                                     for c in ("wm_amt", "wm_amt+fe_sft", "wm_amt+fe_sft+rl"))
    assert all(e["from_step"] == 0 and e["to_step"] == 2 for e in ledger if "train" in e)
    assert sum("eval" in e for e in ledger) == 4
    for seed in (1234, 1235):  # the RL row started from the FE-SFT run the other row evaluated
        config = yaml.safe_load(
            (run_dir / f"seed{seed}" / "wm_amt+fe_sft+rl" / "config.yaml").read_text())
        assert config["checkpoint"]["init_from"] == str(run_dir / f"seed{seed}" /
                                                        "wm_amt+fe_sft")
        assert config["seed"] == seed
        assert config["fc_rl"]["reward_weights"] == {"task": 1.0, "format": 0.5}
    # a second call trains and evaluates nothing again and writes the same table
    foresight(args)
    assert (run_dir / "runs.jsonl").read_text().count("\n") == len(ledger)
    again = json.loads((run_dir / "experiment.json").read_text())
    assert again["rows"] == summary["rows"] and again["per_seed"] == summary["per_seed"]


def test_an_evaluation_is_reused_only_if_whole_of_these_tasks_and_newer_than_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "checkpoints" / "step_0000002" / "metadata.json").write_text("{}")
    out = tmp_path / "eval.json"
    assert read_evaluation(out, run, 8) is None  # none yet
    out.write_text('{"metrics": {"task_success": 0.5}, "ta')  # torn
    assert read_evaluation(out, run, 8) is None
    out.write_text(json.dumps({"tasks": 8, "metrics": {"task_success": 0.5}}))
    assert read_evaluation(out, run, 8) == {"task_success": 0.5}
    assert read_evaluation(out, run, 16) is None  # another --tasks
    later = run / "checkpoints" / "step_0000004"
    later.mkdir()
    (later / "metadata.json").write_text("{}")
    os.utime(later, (out.stat().st_mtime + 5,) * 2)  # trained further after the evaluation
    assert read_evaluation(out, run, 8) is None


def test_a_stage_that_stopped_early_stops_the_command(tmp_path, monkeypatch):
    """As if a stop signal ended training at step 2 of 4 (train returns normally then)."""
    import megatron_foresight.training.loop as loop

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "checkpoints" / "step_0000002" / "metadata.json").write_text("{}")
    monkeypatch.setattr(loop, "train", lambda cfg, run_dir, resume: None)
    cfg = load_recipe(TINY_CPU / "wm_amt.yaml", ["schedule.train_steps=4", "schedule.warmup_steps=0"])
    with pytest.raises(Stopped, match="stopped at step 2 of 4; run the same command again"):
        train_to_end(cfg, run)
    train_to_end(load_recipe(TINY_CPU / "wm_amt.yaml", ["schedule.train_steps=2",
                                                     "schedule.warmup_steps=0"]), run)


def test_a_run_dir_trained_from_another_recipe_is_refused(tmp_path):
    """recipes.json keeps each step's resolved recipe; a later call that resolves a step
    otherwise while its runs exist is refused naming the key; more seeds are fine, and a step
    with no run yet takes the new recipe."""
    run_dir = tmp_path / "exp"
    rows = parse_rows("wm_amt+fe_sft")
    _check_unchanged(Experiment(TINY_CPU, run_dir, [1234], rows, 8))
    kept = json.loads((run_dir / "recipes.json").read_text())
    assert set(kept) == {"wm_amt", "wm_amt+fe_sft"}
    fe_steps = load_recipe(TINY_CPU / "fe_sft.yaml", []).schedule.train_steps
    assert fe_steps != 70  # the override below must change it
    assert kept["wm_amt+fe_sft"]["schedule.train_steps"] == fe_steps and \
        "seed" not in kept["wm_amt"]
    changed = Experiment(TINY_CPU, run_dir, [1234], rows, 8, ["fe_sft:schedule.train_steps=70"])
    _check_unchanged(changed)  # nothing trained yet: the new recipe is kept
    assert json.loads((run_dir / "recipes.json").read_text())[
        "wm_amt+fe_sft"]["schedule.train_steps"] == 70
    (run_dir / "seed1234" / "wm_amt+fe_sft").mkdir(parents=True)
    _check_unchanged(Experiment(TINY_CPU, run_dir, [1234, 1235], rows, 8,
                                ["fe_sft:schedule.train_steps=70"]))  # one more seed
    with pytest.raises(UsageError, match=r"step wm_amt\+fe_sft .*schedule.train_steps: 70 then, "
                                         rf"{fe_steps} now.*new --run-dir"):
        _check_unchanged(Experiment(TINY_CPU, run_dir, [1234], rows, 8))
    (run_dir / "recipes.json").write_text("{not json")
    with pytest.raises(UsageError, match="recipes.json is unreadable"):
        _check_unchanged(Experiment(TINY_CPU, run_dir, [1234], rows, 8))


def test_a_key_the_code_gained_since_is_no_change_at_its_default(tmp_path):
    """A run directory recorded before the code had a key continues while the key resolves to
    its default (the behaviour the code had), and is refused once the recipe sets it
    otherwise; an entry new to a free-form mapping is always a change."""
    run_dir = tmp_path / "exp"
    rows = parse_rows("wm_amt+fe_sft")
    _check_unchanged(Experiment(TINY_CPU, run_dir, [1234], rows, 8))
    (run_dir / "seed1234" / "wm_amt+fe_sft").mkdir(parents=True)
    kept = json.loads((run_dir / "recipes.json").read_text())
    step = kept["wm_amt+fe_sft"]
    defaults = _stage_defaults("fe_sft")
    assert step["fe_sft.pack_documents"] == defaults["fe_sft.pack_documents"]
    assert step["optimizer.lr"] == 3e-3 != defaults["optimizer.lr"]  # the recipe sets it
    del step["fe_sft.pack_documents"]
    (run_dir / "recipes.json").write_text(json.dumps(kept))
    _check_unchanged(Experiment(TINY_CPU, run_dir, [1234], rows, 8))  # continues
    assert "fe_sft.pack_documents" in json.loads(
        (run_dir / "recipes.json").read_text())["wm_amt+fe_sft"]  # recorded from now on
    del step["optimizer.lr"]
    (run_dir / "recipes.json").write_text(json.dumps(kept))
    with pytest.raises(UsageError, match=r"optimizer.lr: null then, 0.003 now"):
        _check_unchanged(Experiment(TINY_CPU, run_dir, [1234], rows, 8))
    # an entry added to a mapping is a change of recipe, even at the mapping's default value
    step["optimizer.lr"] = 3e-3
    assert step["fe_sft.segment_weights.think"] == \
        defaults["fe_sft.segment_weights"]["think"] == 1.0
    del step["fe_sft.segment_weights.think"]
    (run_dir / "recipes.json").write_text(json.dumps(kept))
    with pytest.raises(UsageError, match=r"fe_sft.segment_weights.think: null then, 1.0 now"):
        _check_unchanged(Experiment(TINY_CPU, run_dir, [1234], rows, 8))


def _check_unchanged(experiment):
    experiment.check_unchanged(experiment.check())
