"""Task and corpus files in the usual public layouts, and their errors."""

import json

import pytest

from megatron_foresight.data.records import DataFileError
from megatron_foresight.tasks import Document, Task
from megatron_foresight.data.task_files import read_corpus, read_tasks, write_corpus, write_tasks
from megatron_foresight.data.validate import validate_file
from megatron_foresight.errors import UsageError


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_task_fields_of_nq_hotpotqa_search_r1_triviaqa_gsm8k_and_math(tmp_path):
    path = _write(tmp_path / "tasks.jsonl", [
        {"question": "who wrote it?", "answer": ["Ann", "Ann B."]},           # NQ
        {"_id": "hp", "question": "which?", "answer": "Kalo", "type": "bridge",
         "level": "hard"},                                                    # HotpotQA
        {"id": "sr1", "question": "where?", "golden_answers": ["Kalo"]},      # Search-R1
        {"question": "who?", "answer": {"value": "Ann", "aliases": ["Ann", "A. B."]}},  # TriviaQA
    ])
    # the task set's environment gives the type (HotpotQA's own `type` is not ours)
    tasks = list(read_tasks(path, task_type="search"))
    assert [(t.id, t.type, t.answers) for t in tasks] == [
        ("tasks-1", "search", ("Ann", "Ann B.")), ("hp", "search", ("Kalo",)),
        ("sr1", "search", ("Kalo",)), ("tasks-4", "search", ("Ann", "A. B."))]
    math = _write(tmp_path / "gsm8k.jsonl.gz", [])
    import gzip
    math.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in [
        {"question": "how many?", "answer": "3 + 4 = 7 apples.\n#### 7"},      # GSM8K
        {"problem": "half of 1?", "solution": "It is \\boxed{\\frac{1}{2}}."},  # MATH
        {"question": "count", "answer": 12}]).encode()))
    assert [(t.id, t.type, t.answers) for t in read_tasks(math, task_type="math")] == [
        ("gsm8k-1", "math", ("7",)), ("gsm8k-2", "math", ("\\frac{1}{2}",)),
        ("gsm8k-3", "math", ("12",))]


def test_task_id_question_and_answer_aliases(tmp_path):
    path = _write(tmp_path / "aliases.jsonl", [
        {"_id": "h1", "query": " q1 ", "answers": ["a", 2.5], "type": "search"},   # HotpotQA/BEIR
        {"task_id": 7, "problem": "p", "answer": "x\n#### 1,000", "type": "math",
         "meta": {"level": 3}},
        {"problem": "p2", "answer": "5", "solution": "\\boxed{6}", "type": "math"},
    ])
    assert list(read_tasks(path)) == [
        Task("h1", "search", "q1", ("a", "2.5")), Task("7", "math", "p", ("1,000",), {"level": 3}),
        Task("aliases-3", "math", "p2", ("5",))]


@pytest.mark.parametrize("record, field, words", [
    ({"answer": "x"}, None, "not a task layout this reads (keys: answer)"),
    ({"question": "q"}, "answers", "missing"),
    ({"question": "q", "answers": []}, "answers", "at least one"),
    ({"question": "q", "answer": {"a": 1}}, "answer", "needs a 'value'"),
    ({"question": "q", "solution": "no box"}, "solution", "boxed"),
    ({"question": "q", "answer": "a", "id": "dup"}, "id", "duplicate task id 'dup' (first at "
                                                         "line 1)"),
    ({"question": "  ", "answer": "a"}, "question", "must be a non-empty string"),
    ({"problem": 3, "answer": "a"}, "problem", "must be a non-empty string"),
    ({"question": "q", "answers": ["a", None]}, "answers[1]", "strings or numbers"),
    ({"question": "q", "answer": True}, "answer", "strings or numbers"),
    ({"question": "q", "answer": "reasoning ####  "}, "answer", "must not be empty"),
    ({"question": "q", "solution": ["\\boxed{1}"]}, "solution", "must be a string"),
    ({"question": "q", "answer": "a", "_id": True}, "_id", "string or an integer"),
    ({"question": "q", "answer": "a", "id": ""}, "id", "must not be empty"),
    ({"question": "q", "answer": "a", "meta": "x"}, "meta", "must be an object"),
    ([1], None, "must be a JSON object"),
])
def test_task_errors_name_line_and_field(tmp_path, record, field, words):
    path = _write(tmp_path / "t.jsonl", [{"id": "dup", "question": "ok", "answer": "1"}, record])
    with pytest.raises(DataFileError) as error:
        list(read_tasks(path, task_type="search"))
    assert (error.value.line, error.value.field) == (2, field) and words in error.value.message


def test_task_type_comes_from_the_record_or_the_task_set(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataFileError, match=r"t.jsonl:1: field 'type': missing: .* read the "
                                            r"file as a task set of the recipe"):
        list(read_tasks(path))
    bad = _write(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a", "type": "two words"}])
    with pytest.raises(DataFileError, match="bad.jsonl:1: field 'type': must be an environment "
                                            "name"):
        list(read_tasks(bad))
    with pytest.raises(UsageError, match="file not found"):
        list(read_tasks(tmp_path / "nope.jsonl", task_type="math"))


def test_an_unknown_layout_names_the_keys_it_saw_and_the_layouts(tmp_path):
    path = _write(tmp_path / "squad.jsonl", [{"title": "x", "context": "c", "qas": []}])
    with pytest.raises(DataFileError) as error:
        list(read_tasks(path, task_type="search"))
    message = str(error.value)
    assert message.startswith(f"{path}:1: not a task layout this reads (keys: title, context, "
                              "qas); expected NQ / HotpotQA")
    assert "GSM8K" in message and "MATH" in message


def test_skipped_records_are_counted_not_dropped_silently(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}, {"question": ""},
                                         "{broken", {"question": "r", "answer": "b"}])
    skipped = []
    assert [t.question for t in read_tasks(path, "search", skipped)] == ["q", "r"]
    assert [(e.line, e.field) for e in skipped] == [(2, "question"), (3, None)]
    with pytest.raises(DataFileError, match=r"t.jsonl:2: field 'question'"):
        list(read_tasks(path, "search"))


def test_tasks_and_corpus_round_trip_byte_identically(tmp_path):
    tasks = [Task("a", "search", "Où est Kalo?", ("Mirten",)),
             Task("b", "math", "1+1", ("2",), {"source": "gsm8k"})]
    write_tasks(tasks, tmp_path / "t" / "tasks.jsonl")
    assert list(read_tasks(tmp_path / "t" / "tasks.jsonl")) == tasks
    assert (tmp_path / "t" / "tasks.jsonl").read_text(encoding="utf-8").splitlines()[0] == (
        '{"id":"a","type":"search","question":"Où est Kalo?","answers":["Mirten"]}')
    write_tasks(read_tasks(tmp_path / "t" / "tasks.jsonl"), tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "t" / "tasks.jsonl").read_bytes()
    docs = [Document("1", "Kalo", "Kalo is a city."), Document("2", "", "untitled")]
    write_corpus(docs, tmp_path / "c.jsonl")
    assert list(read_corpus(tmp_path / "c.jsonl")) == docs
    assert not list(tmp_path.rglob("*.tmp"))


def test_corpus_plain_and_search_r1_forms_and_errors(tmp_path):
    path = _write(tmp_path / "c.jsonl", [
        {"id": "1", "title": "Kalo", "text": "Kalo is a city."},
        {"id": 2, "contents": "\"Vasru\"\nVasru trades salt.\nAnd fish."},
        {"_id": "3", "title": "Mirten", "text": "A port."},                      # BEIR
    ])
    docs = list(read_corpus(path))
    assert [(d.id, d.title, d.text) for d in docs] == [
        ("1", "Kalo", "Kalo is a city."), ("2", "Vasru", "Vasru trades salt.\nAnd fish."),
        ("3", "Mirten", "A port.")]
    bad = _write(tmp_path / "bad.jsonl", [
        {"id": "1", "text": "a"}, {"id": "1", "text": "b"}, {"title": "x", "text": "c"},
        {"id": "3", "body": "d"}, {"id": "4", "contents": 5}, {"id": "5", "title": 1, "text": ""},
        {"id": None, "text": "e"}])
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: field 'id': duplicate document id "
                                            r"'1' \(first at line 1\)"):
        list(read_corpus(bad))
    report = validate_file(bad, "corpus")
    assert [(p.line, p.field) for p in report.problems] == [
        (2, "id"), (3, "id"), (4, "text"), (5, "contents"), (6, "title"), (7, "id")]
    assert report.counts() == {"id": 3, "text": 1, "contents": 1, "title": 1}
