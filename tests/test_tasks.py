"""Task and corpus files in the usual public layouts, and their errors."""

import json

import pytest

from megatron_foresight.data.records import DataFileError
from megatron_foresight.data.tasks import last_boxed, read_corpus, read_tasks
from megatron_foresight.data.validate import validate_file


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_task_fields_of_nq_search_r1_gsm8k_and_math(tmp_path):
    path = _write(tmp_path / "tasks.jsonl", [
        {"question": "who wrote it?", "answer": ["Ann", "Ann B."]},           # NQ
        {"id": "sr1", "question": "where?", "golden_answers": ["Kalo"]},      # Search-R1
        {"question": "how many?", "answer": "3 + 4 = 7 apples.\n#### 7", "type": "math"},
        {"problem": "half of 1?", "solution": "It is \\boxed{\\frac{1}{2}}.", "type": "math"},
        {"question": "count", "answer": 12, "type": "math"},
    ])
    tasks = list(read_tasks(path, task_type="search"))
    assert [(t.id, t.type, t.answers) for t in tasks] == [
        ("tasks-1", "search", ("Ann", "Ann B.")), ("sr1", "search", ("Kalo",)),
        ("tasks-3", "math", ("7",)), ("tasks-4", "math", ("\\frac{1}{2}",)),
        ("tasks-5", "math", ("12",))]
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert last_boxed("no box") is None


@pytest.mark.parametrize("record, field, words", [
    ({"answer": "x"}, "question", "question / problem / query"),
    ({"question": "q"}, "answers", "missing"),
    ({"question": "q", "answers": []}, "answers", "at least one"),
    ({"question": "q", "answer": {"a": 1}}, "answer", "strings or numbers"),
    ({"question": "q", "solution": "no box"}, "solution", "boxed"),
    ({"question": "q", "answer": "a", "type": "chess"}, "type", "must be one of"),
    ({"question": "q", "answer": "a", "id": "dup"}, "id", "duplicate"),
])
def test_task_errors_name_line_and_field(tmp_path, record, field, words):
    path = _write(tmp_path / "t.jsonl", [{"id": "dup", "question": "ok", "answer": "1"}, record])
    with pytest.raises(DataFileError) as error:
        list(read_tasks(path, task_type="search"))
    assert (error.value.line, error.value.field) == (2, field) and words in error.value.message


def test_task_type_must_be_known(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataFileError, match="field 'type': missing"):
        list(read_tasks(path))


def test_corpus_plain_and_search_r1_forms_and_errors(tmp_path):
    path = _write(tmp_path / "c.jsonl", [
        {"id": "1", "title": "Kalo", "text": "Kalo is a city."},
        {"id": 2, "contents": "\"Vasru\"\nVasru trades salt."},
    ])
    docs = list(read_corpus(path))
    assert [(d.id, d.title, d.text) for d in docs] == [
        ("1", "Kalo", "Kalo is a city."), ("2", "Vasru", "Vasru trades salt.")]
    bad = _write(tmp_path / "bad.jsonl", [{"id": "1", "text": "a"}, {"id": "1", "text": "b"},
                                          {"title": "x", "text": "c"}, {"id": "3", "body": "d"}])
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: field 'id': duplicate"):
        list(read_corpus(bad))
    report = validate_file(bad, "corpus")
    assert [(p.line, p.field) for p in report.problems] == [(2, "id"), (3, "id"), (4, "text")]
