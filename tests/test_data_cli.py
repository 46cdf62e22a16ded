"""The `foresight data` command line, run as a user runs it."""

import json

from helpers.run import REPO, foresight, python


def test_build_world_validate_preprocess_and_import(tmp_path):
    world = tmp_path / "world"
    out = foresight(["data", "build-world", "--out", str(world), "--seed", "2", "--cities", "20",
                     "--people", "40", "--guilds", "6", "--search-tasks", "100",
                     "--math-tasks", "100", "--trajectories", "30",
                     "--validation-trajectories", "6", "--mc-samples", "2",
                     "--vocab-size", "600"]).stdout
    assert "search/noise=0.0" in out and out.strip().endswith(str(world))
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["sizes"]["trajectories"] == 30 and "tokenizer/spm.model" in manifest["files"]

    ok = foresight(["data", "validate", str(world / "trajectories" / "train.jsonl"),
                    str(world / "tasks" / "math-test.jsonl"), str(world / "corpus.jsonl")])
    assert ok.stdout.count("no problems") == 3
    bad = world / "bad.jsonl"
    bad.write_text((world / "trajectories" / "train.jsonl").read_text().replace(
        '"role":"env"', '"role":"user"', 1))
    failed = foresight(["data", "validate", str(bad)], check=False)
    assert failed.returncode == 1 and "bad.jsonl:1: field 'turns[1].role'" in failed.stdout
    missing = foresight(["data", "validate", str(tmp_path / "nope.jsonl")], check=False)
    assert missing.returncode == 2 and "file not found" in missing.stderr

    pre = python([str(REPO / "tools" / "preprocess_data.py"), "--input",
                  str(world / "trajectories" / "train.jsonl"), "--output-prefix",
                  str(tmp_path / "idx" / "traj"), "--tokenizer", str(world / "tokenizer" /
                                                                    "spm.model"),
                  "--workers", "2"])
    assert "30 documents" in pre.stdout
    meta = json.loads((tmp_path / "idx" / "traj.json").read_text())
    assert meta["tokenizer"]["type"] == "sentencepiece" and meta["documents"] == 30
    unknown = foresight(["data", "preprocess", "--input", str(bad), "--output-prefix",
                         str(tmp_path / "x"), "--renderer", "nope"], check=False)
    assert unknown.returncode == 2 and "known renderers: text, transcript" in unknown.stderr
    chat = foresight(["data", "preprocess", "--input", str(bad), "--output-prefix",
                      str(tmp_path / "x"), "--chat-template"], check=False)
    assert chat.returncode == 2 and "--chat-template needs a Hugging Face tokenizer " \
        "directory as --tokenizer" in chat.stderr and chat.stderr.count("\n") == 1

    tasks = tmp_path / "gsm.jsonl"
    imported = foresight(["data", "import", "reasoning-gym", "gsm_symbolic", "--n", "4",
                          "--seed", "1", "--out", str(tasks)])
    assert "4 tasks" in imported.stdout and len(tasks.read_text().splitlines()) == 4


def test_data_help_explains_each_command():
    for command in ("validate", "build-world", "import", "preprocess"):
        text = foresight(["data", command, "--help"]).stdout
        assert "usage: foresight data " + command in text
    assert "--mc-samples" in foresight(["data", "build-world", "--help"]).stdout
