"""The agent stages on task files that are not the world's, through the real command line:
an NQ-layout search set with its own corpus and a GSM8K-layout math set (gzip), mixed by
weight, for FC-RL and `foresight eval`; and a toy environment registered from a module of its
own, played by `foresight eval` (slow)."""

import gzip
import json
import os

import pytest

from helpers.run import REPO, foresight

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

CITIES = ["Kalo", "Mirten", "Vasru", "Ostra", "Belin", "Tarq", "Umbel", "Zoren", "Pell", "Risa"]
RIVERS = ["Amber", "Silt", "Gray", "Reed"]


def _jsonl(path, records, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(text) if compress else text)
    return path


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """An NQ-layout question file over a corpus of its own, a GSM8K-layout problem file."""
    d = tmp_path_factory.mktemp("user-data")
    _jsonl(d / "corpus.jsonl", [
        {"id": f"p{i}", "title": c, "text": f"{c} lies on the {RIVERS[i % 4]} river and was "
                                            f"founded in {1500 + 13 * i}."}
        for i, c in enumerate(CITIES)])
    questions = [{"question": f"Which river does {c} lie on?", "answer": [RIVERS[i % 4]]}
                 for i, c in enumerate(CITIES)]
    _jsonl(d / "nq_train.jsonl", questions[:7])
    _jsonl(d / "nq_dev.jsonl", questions[7:])
    _jsonl(d / "gsm8k.jsonl.gz", [
        {"question": f"A shop has {a} crates and gets {b} more. How many crates now?",
         "answer": f"It has {a} + {b} = {a + b} crates.\n#### {a + b}"}
        for a, b in [(3, 4), (12, 9), (7, 7), (20, 5), (6, 11), (9, 2)]], compress=True)
    recipe = d / "rl.yaml"
    recipe.write_text(f"""\
base: {REPO / "recipes" / "tiny-cpu" / "fc_rl.yaml"}
tasks:
  - name: nq
    env: search
    splits: {{train: {d}/nq_train.jsonl, validation: {d}/nq_dev.jsonl}}
    weight: 1
    options: {{corpus: {d}/corpus.jsonl, top_k: 2}}
  - name: gsm8k
    env: math
    splits: {{train: {d}/gsm8k.jsonl.gz, validation: {d}/gsm8k.jsonl.gz}}
    weight: 3
    options: {{symbolic: false}}
""")
    return d


def test_fc_rl_and_eval_play_the_users_tasks_mixed_by_weight(user_files, medium_world,
                                                              medium_fe_sft, tmp_path):
    """From the FE-SFT policy of the medium world (its tokenizer), FC-RL trains two steps on
    the user's sets and `foresight eval` reports each set with its own scores."""
    common = [f"data.world={medium_world}", f"data.cache_dir={tmp_path / 'cache'}",
              "data.seq_length=768", "logging.tensorboard=false"]
    run = tmp_path / "rl"
    foresight(["train", str(user_files / "rl.yaml"), *common,
               f"checkpoint.init_from={medium_fe_sft}", "schedule.train_steps=2",
               "schedule.global_batch_size=4", "schedule.micro_batch_size=2",
               "schedule.eval_interval=0", "schedule.eval_at_start=false",
               "fc_rl.prompts_per_step=4", "fc_rl.group_size=2", "fc_rl.max_new_tokens=160",
               "fc_rl.validation_tasks=4", "checkpoint.save_interval=0", "--run-dir", str(run)])
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    drawn = {k: sum(s.get(k, 0) for s in steps) for k in ("rollout/tasks/nq",
                                                             "rollout/tasks/gsm8k")}
    assert sum(drawn.values()) == 2 * 4 and drawn["rollout/tasks/gsm8k"] >= 1, drawn
    assert all(set(("reward/task", "reward/calibration", "reward/fidelity", "reward/format",
                    "policy_loss", "grad_norm")) <= set(s) for s in steps)
    assert steps[-1]["val/nq/turns_per_episode"] >= 1 and "val/gsm8k/accuracy" in steps[-1]
    assert len(list((tmp_path / "cache" / "retrieval").iterdir())) == 1  # indexed once

    out = tmp_path / "new" / "dir" / "eval.json"  # the directory does not exist yet
    foresight(["eval", str(user_files / "rl.yaml"), *common, "--ckpt", str(run), "--tasks", "6",
               "--max-new-tokens", "160", "--out", str(out)])
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["task_sets"] == ["nq", "gsm8k"]
    for key in ("nq/em", "nq/f1", "nq/task_success", "nq/format_validity", "gsm8k/accuracy",
                "gsm8k/format_validity", "task_success", "val/reward/total"):
        assert key in metrics, key
    episodes = [json.loads(x) for x in (out.parent / "eval.json.episodes.jsonl").open()]
    # three of each (nq has 3 validation tasks), alternating
    assert [e["task_set"] for e in episodes] == ["nq", "gsm8k"] * 3
    # each set's own environment answered its episodes (the policy, trained on the world,
    # need not search well on these questions: what it did is the model's, not the test's)
    tags = {s: {t["env"][:t["env"].index(">") + 1] for e in episodes if e["task_set"] == s
                for t in e["turns"] if t["env"]} for s in ("nq", "gsm8k")}
    assert tags["nq"] <= {"<information>"} and tags["gsm8k"] <= {"<result>"}, tags

    one_off = tmp_path / "one-off.json"
    foresight(["eval", str(user_files / "rl.yaml"), *common, "--ckpt", str(run), "--tasks", "2",
               "--max-new-tokens", "120", "--tasks-file", str(user_files / "nq_dev.jsonl"),
               "--env", "search", "--corpus", str(user_files / "corpus.jsonl"),
               "--out", str(one_off)])
    assert set(json.loads(one_off.read_text())["metrics"]) >= {"nq_dev/em", "nq_dev/f1"}


def test_a_toy_environment_from_its_own_module_plays_through_eval(tmp_path):
    """tests/helpers/toy_env.py registers `convert`; a recipe names the module and a task set
    of it; `foresight eval` plays it (the random model writes no valid action: each turn is
    answered in the toy environment's own <conversion> tag) and reports the set."""
    tasks = _jsonl(tmp_path / "units.jsonl", [{"question": "3 km in m?", "answer": "3000"},
                                              {"question": "2 m in cm?", "answer": "200"}])
    recipe = tmp_path / "units.yaml"
    recipe.write_text(f"""\
base: {REPO / "recipes" / "tiny-cpu" / "fc_rl.yaml"}
extensions: [helpers.toy_env]
data: {{tokenizer: {{type: byte}}, world: null, seq_length: 512}}
tasks:
  - {{name: units, env: convert, splits: {{train: {tasks}, validation: {tasks}}},
     options: {{max_turns: 2}}}}
""")
    out = tmp_path / "eval.json"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    foresight(["eval", str(recipe), f"data.cache_dir={tmp_path / 'cache'}", "--tasks", "2",
               "--max-new-tokens", "8", "--out", str(out)], env=env)
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["units/accuracy"] == 0.0 and metrics["units/turns_per_episode"] == 2
    episodes = [json.loads(x) for x in (tmp_path / "eval.json.episodes.jsonl").open()]
    assert all(e["task_set"] == "units" and e["ended"] == "max_turns" for e in episodes)
    assert episodes[0]["turns"][0]["env"].startswith("<conversion>invalid turn")
