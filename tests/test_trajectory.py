"""The trajectory schema: JSONL <-> webdataset round trips, and every error the validator
reports, located by file, line and field."""

import copy
import json

import pytest

from megatron_foresight.data.records import DataFileError
from megatron_foresight.data.trajectory import (
    Trajectory, read_trajectories, write_jsonl, write_shards,
)
from megatron_foresight.data.validate import main as validate_main
from megatron_foresight.data.validate import validate_file

GOOD = {"schema": "foresight.trajectory/1", "id": "t-0", "task_id": "q-0", "task_type": "search",
        "prompt": "Question: where is Kalo?",
        "turns": [{"role": "agent", "text": "<search>Kalo</search>"},
                  {"role": "env", "text": "<information>Kalo is in Mirten.</information>"},
                  {"role": "agent", "text": "<answer>Mirten</answer>"}],
        "outcome": {"success": True, "reward": 1.0, "answer": "Mirten"},
        "mc": [{"turn": 0, "n": 4, "successes": 3}, {"turn": 1, "n": 4, "successes": 4}],
        "meta": {"noise": 0.1}}


def _many(n):
    for i in range(n):
        record = copy.deepcopy(GOOD)
        record["id"] = f"t-{i}"
        record["outcome"]["success"] = i % 3 != 0
        yield Trajectory.from_dict(record)


def test_jsonl_to_shards_to_jsonl_is_byte_identical_and_webdataset_reads_the_shards(tmp_path):
    import webdataset

    write_jsonl(_many(25), tmp_path / "a.jsonl")
    shards = write_shards(read_trajectories(tmp_path / "a.jsonl"), tmp_path / "shards",
                          per_shard=10)
    assert [s.name for s in shards] == [f"trajectories-00000{i}.tar" for i in range(3)]
    write_jsonl(read_trajectories(tmp_path / "shards"), tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    again = write_shards(_many(25), tmp_path / "again", per_shard=10)
    assert [s.read_bytes() for s in again] == [s.read_bytes() for s in shards]
    samples = list(webdataset.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert [json.loads(s["json"])["id"] for s in samples] == [f"t-{i}" for i in range(25)]
    assert Trajectory.from_dict(json.loads(samples[3]["json"])) == list(_many(4))[3]


def test_reader_streams(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        f.write(json.dumps(GOOD) + "\n")
        f.write("not json\n" * 50000)
    first = next(iter(read_trajectories(path)))  # the bad lines after it are never read
    assert first.id == "t-0" and first.mc[0].value == 0.75


def _set(path, value):
    def change(record):
        *parents, last = path
        target = record
        for key in parents:
            target = target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
        return record
    return change


DELETE = object()
CASES = [  # (what is changed, the field reported, words of the message)
    (lambda r: "not json {", None, "not valid JSON"),
    (lambda r: [1, 2], None, "must be a JSON object"),
    (_set(["schema"], DELETE), "schema", "missing"),
    (_set(["schema"], "foresight.trajectory/9"), "schema", "unknown version"),
    (_set(["reward"], 1.0), "reward", "unknown key"),
    (_set(["id"], DELETE), "id", "missing"),
    (_set(["id"], " "), "id", "must not be empty"),
    (_set(["task_type"], "chess"), "task_type", "must be one of search, math"),
    (_set(["turns"], []), "turns", "must not be empty"),
    (_set(["turns", 0, "role"], "env"), "turns[0].role", "must be agent"),
    (_set(["turns", 1, "role"], "agent"), "turns[1].role", "must be env"),
    (_set(["turns", 2, "role"], "user"), "turns[2].role", "must be agent or env"),
    (_set(["turns", 1, "text"], 7), "turns[1].text", "must be a string"),
    (_set(["turns", 1, "speaker"], "x"), "turns[1].speaker", "unknown key"),
    (_set(["outcome", "success"], 1), "outcome.success", "must be true or false"),
    (_set(["outcome", "reward"], float("nan")), "outcome.reward", "must be finite"),
    (_set(["outcome", "reward"], "1"), "outcome.reward", "must be a number"),
    (_set(["mc", 1, "successes"], 5), "mc[1].successes", "between 0 and n=4"),
    (_set(["mc", 1, "turn"], 2), "mc[1].turn", "must name an agent turn, 0 to 1"),
    (_set(["mc", 1, "turn"], 0), "mc[1].turn", "strictly increasing"),
    (_set(["mc", 0, "n"], True), "mc[0].n", "must be an integer"),
    (_set(["meta"], [1]), "meta", "must be an object"),
]


@pytest.mark.parametrize("change, field, words", CASES)
def test_each_malformed_record_is_reported_with_line_and_field(tmp_path, change, field, words):
    bad = change(copy.deepcopy(GOOD))
    lines = [json.dumps(dict(GOOD, id="first")), bad if isinstance(bad, str) else json.dumps(bad)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError) as error:
        list(read_trajectories(path))
    assert (error.value.line, error.value.field) == (2, field)
    assert words in error.value.message
    report = validate_file(path)
    assert [(p.line, p.field) for p in report.problems] == [(2, field)]


def test_validator_reports_every_problem_with_counts(tmp_path, capsys):
    records = [dict(GOOD, id=f"t-{i}") for i in range(10)]
    records[2] = dict(records[2], task_type="chess")
    records[5] = dict(records[5], turns=[{"role": "env", "text": "x"}])
    records[7] = dict(records[7], id="t-1")
    lines = [json.dumps(r) for r in records]
    lines.insert(4, "{broken")
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = validate_file(path)
    assert report.records == 11 and report.kind == "trajectories"
    assert [(p.line, p.field) for p in report.problems] == [
        (3, "task_type"), (5, None), (7, "turns[0].role"), (9, "id")]
    assert report.counts() == {"task_type": 1, "(record)": 1, "turns[].role": 1, "id": 1}
    assert "duplicate id 't-1' (first at line 2)" in report.format()
    assert validate_main([str(path)]) == 1
    assert "11 records (trajectories), 4 problems" in capsys.readouterr().out
    path.write_text(json.dumps(GOOD) + "\n")
    assert validate_main([str(path)]) == 0
