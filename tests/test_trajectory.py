"""The trajectory schema: JSONL <-> webdataset round trips, and every error the validator
reports, located by file, line and field."""

import copy
import io
import json
import tarfile

import pytest

from megatron_foresight.data.records import DataFileError, iter_jsonl
from megatron_foresight.data.trajectory import (
    Trajectory, read_trajectories, write_jsonl, write_shards,
)
from megatron_foresight.data.validate import main as validate_main
from megatron_foresight.data.validate import validate_file
from megatron_foresight.errors import UsageError

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
    (lambda r: "not json {", None, "not valid JSON (Expecting value at column 1)"),
    (lambda r: b'{"id": "caf\xe9"}', None, "not valid UTF-8 (byte 12)"),
    (lambda r: [1, 2], None, "must be a JSON object"),
    (_set(["schema"], DELETE), "schema", "missing"),
    (_set(["schema"], "foresight.trajectory/9"), "schema", "unknown version"),
    (_set(["reward"], 1.0), "reward", "unknown key"),
    (_set(["id"], DELETE), "id", "missing"),
    (_set(["id"], " "), "id", "must not be empty"),
    (_set(["id"], "first"), "id", "duplicate trajectory id 'first' (first at line 1)"),
    (_set(["task_type"], DELETE), "task_type", "missing"),
    (_set(["task_type"], "chess game"), "task_type", "must be an environment's name"),
    (_set(["turns"], []), "turns", "must not be empty"),
    (_set(["turns", 0, "role"], "env"), "turns[0].role", "must be agent"),
    (_set(["turns", 1, "role"], "agent"), "turns[1].role", "must be env"),
    (_set(["turns", 2, "role"], "user"), "turns[2].role", "must be agent or env"),
    (_set(["turns", 1, "text"], 7), "turns[1].text", "must be a string"),
    (_set(["turns", 1], "hello"), "turns[1]", "must be an object"),
    (_set(["outcome"], DELETE), "outcome", "missing"),
    (_set(["outcome", "answer"], 3), "outcome.answer", "must be a string or null"),
    (_set(["turns", 1, "speaker"], "x"), "turns[1].speaker", "unknown key"),
    (_set(["outcome", "success"], 1), "outcome.success", "must be true or false"),
    (_set(["outcome", "reward"], float("nan")), "outcome.reward", "must be a finite number"),
    (_set(["outcome", "reward"], float("inf")), "outcome.reward", "must be a finite number"),
    (_set(["outcome", "reward"], 10 ** 400), "outcome.reward", "must be a finite number"),
    (_set(["outcome", "reward"], "1"), "outcome.reward", "must be a number"),
    (_set(["mc", 1, "successes"], 5), "mc[1].successes", "between 0 and n=4"),
    (_set(["mc", 1, "turn"], 2), "mc[1].turn", "must name an agent turn, 0 to 1"),
    (_set(["mc", 1, "turn"], 0), "mc[1].turn", "strictly increasing"),
    (_set(["mc", 0, "n"], True), "mc[0].n", "must be an integer"),
    (_set(["mc", 0, "n"], 0), "mc[0].n", "must be at least 1"),
    (_set(["mc", 0, "extra"], 1), "mc[0].extra", "unknown key"),
    (_set(["mc"], {"turn": 0}), "mc", "must be a list"),
    (_set(["meta"], [1]), "meta", "must be an object"),
]


@pytest.mark.parametrize("change, field, words", CASES, ids=[f"{c[1]}: {c[2]}" for c in CASES])
def test_each_malformed_record_is_reported_with_line_and_field(tmp_path, change, field, words):
    bad = change(copy.deepcopy(GOOD))
    if not isinstance(bad, (str, bytes)):
        bad = json.dumps(bad)
    lines = [json.dumps(dict(GOOD, id="first")).encode(),
             bad if isinstance(bad, bytes) else bad.encode()]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFileError) as error:
        list(read_trajectories(path))
    assert (error.value.line, error.value.field) == (2, field)
    assert words in error.value.message
    report = validate_file(path)
    assert [(p.line, p.field) for p in report.problems] == [(2, field)]


def test_validator_reports_every_problem_with_counts(tmp_path, capsys):
    records = [dict(GOOD, id=f"t-{i}") for i in range(10)]
    records[2] = dict(records[2], task_type="chess game")
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
    out = capsys.readouterr().out
    assert f"{path}:7: field 'turns[0].role': turns alternate" in out
    assert out.rstrip().endswith(
        "11 records (trajectories), 4 problems (1 in field task_type, 1 in the record, "
        "1 in field turns[].role, 1 in field id)")
    assert report.format(max_listed=1).splitlines()[1] == "... and 3 more"
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(GOOD) + "\n")
    assert validate_main([str(clean)]) == 0
    assert capsys.readouterr().out.strip() == f"{clean}: 1 records (trajectories), no problems"
    missing = tmp_path / "missing.jsonl"
    assert validate_main([str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: file not found: {missing}"
    assert validate_main([str(clean), str(missing), str(path)]) == 2  # all are still reported
    assert capsys.readouterr().out.count("records (trajectories)") == 2


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shard_problems_are_located_by_member(tmp_path):
    shards = tmp_path / "shards"
    write_shards(_many(3), shards, per_shard=2)
    good = json.dumps(dict(GOOD, id="t-9")).encode()
    _tar(shards / "trajectories-000002.tar", [("000000004.json", good), ("000000004.txt", b"x"),
                                              ("000000005.json", b"{"),
                                              ("000000006.json", good)])
    with pytest.raises(DataFileError) as error:
        list(read_trajectories(shards))
    assert (error.value.path, error.value.line) == (str(shards / "trajectories-000002.tar"),
                                                    "000000005.json")
    report = validate_file(shards)
    assert report.records == 6
    assert [(p.line, p.field) for p in report.problems] == [("000000005.json", None),
                                                            ("000000006.json", "id")]
    assert "(first at trajectories-000002.tar:000000004.json)" in report.problems[1].message
    broken = tmp_path / "broken.tar"
    broken.write_bytes(_tar(tmp_path / "whole.tar", [("000000000.json", good)]).read_bytes()[:700])
    with pytest.raises(DataFileError, match="not a readable tar archive"):
        list(read_trajectories(broken))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"holds no shards \(\*.tar, \*.jsonl"):
        list(read_trajectories(tmp_path / "empty"))


def test_shard_patterns_stale_shards_and_failed_writes(tmp_path):
    pattern = tmp_path / "out" / "train-%03d.tar"
    assert [s.name for s in write_shards(_many(5), pattern, per_shard=2)] == [
        "train-000.tar", "train-001.tar", "train-002.tar"]
    write_shards(_many(3), pattern, per_shard=2)  # a shorter run removes the earlier third shard
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train-000.tar",
                                                                   "train-001.tar"]
    assert [t.id for t in read_trajectories(tmp_path / "out")] == ["t-0", "t-1", "t-2"]

    def failing():
        yield from _many(3)
        raise RuntimeError("input broke")
    with pytest.raises(RuntimeError):
        write_shards(failing(), tmp_path / "failed", per_shard=2)
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == ["trajectories-000000.tar"]
    with pytest.raises(UsageError, match="one number field"):
        write_shards(_many(1), tmp_path / "train-%d-%d.tar")
    with pytest.raises(UsageError, match="per_shard"):
        write_shards(_many(1), tmp_path / "x", per_shard=0)


def test_iter_jsonl_numbers_lines_and_reports_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\n  \n[2]\n{"b": }\n')
    records = iter_jsonl(path)
    assert next(records) == (1, {"a": 1}) and next(records) == (4, [2])
    with pytest.raises(DataFileError) as error:
        next(records)
    assert (error.value.line, error.value.field) == (5, None)
    assert error.value.message == "not valid JSON (Expecting value at column 7)"
    with pytest.raises(UsageError, match="file not found: .*nope.jsonl"):
        next(iter_jsonl(tmp_path / "nope.jsonl"))


def test_validator_detects_what_a_file_holds(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('[1]\n{"query": "q", "golden_answers": ["a"]}\n{"query": "q"}\n')
    report = validate_file(tasks)
    assert report.kind == "tasks" and [(p.line, p.field) for p in report.problems] == [
        (1, None), (3, "answers")]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "d", "contents": "\\"T\\"\\nbody"}\n')
    assert validate_file(corpus).kind == "corpus"
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"name": "x"}\n')
    with pytest.raises(UsageError, match="odd.jsonl:1: cannot tell .* pass --kind"):
        validate_file(odd)
    with pytest.raises(UsageError, match="unknown kind 'docs'"):
        validate_file(odd, "docs")
