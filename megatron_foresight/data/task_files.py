"""Tasks (a question and its reference answers) and corpora (documents for the retriever) from
users' JSONL files (`.jsonl.gz` too). Reads the usual public layouts: NQ / HotpotQA (`question`,
`answer(s)`), Search-R1 (`golden_answers`; corpus `contents` = '"Title"\\ntext'), TriviaQA
(`answer` = {value, aliases}), GSM8K (`answer` ending in `#### 72`) and MATH (`problem`,
`solution` with `\\boxed{...}`).

A task's `type` names the environment that plays it (`envs.registry`). Files in the public
layouts have none: a task set of the recipe reads them for its environment, which gives the
type (a record's own `type` field, such as HotpotQA's "bridge", is then not ours and ignored)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from megatron_foresight.data.records import RecordError, json_line, read_unique, write_lines
from megatron_foresight.tasks import Document, Task
from megatron_foresight.answers import extract_boxed

QUESTION_KEYS = ("question", "problem", "query")
ANSWER_KEYS = ("answers", "golden_answers", "answer")
TASK_ID_KEYS = ("id", "_id", "task_id")
DOCUMENT_ID_KEYS = ("id", "_id")
LAYOUTS = ("NQ / HotpotQA {question, answer(s)}, Search-R1 {question, golden_answers}, TriviaQA "
           "{question, answer: {value, aliases}}, GSM8K {question, answer: '... #### 72'}, MATH "
           "{problem, solution with \\boxed{}}")
_TYPE_NAME = re.compile(r"[A-Za-z_][\w-]*")


def _record_id(record: dict, keys: tuple[str, ...], default: str | None) -> str:
    key = next((k for k in keys if k in record), None)
    if key is None:
        if default is None:
            raise RecordError("id", f"missing: each record needs one of the fields "
                                    f"{' / '.join(keys)}")
        return default
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(key, f"must be a string or an integer, got {json.dumps(value)[:60]}")
    if not str(value).strip():
        raise RecordError(key, "must not be empty")
    return str(value)


def _answer_text(value, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(field, f"answers must be strings or numbers, got "
                                 f"{json.dumps(value)[:60]}")
    text = str(value).strip()
    if "####" in text:  # GSM8K: the reasoning, then "#### <final answer>"
        text = text.rsplit("####", 1)[1].strip()
    if not text:
        raise RecordError(field, "an answer must not be empty")
    return text


def _answers(record: dict) -> tuple[str, ...]:
    for key in ANSWER_KEYS:
        if key in record:
            value = record[key]
            if isinstance(value, dict):  # TriviaQA: {value, aliases, ...}
                aliases = value.get("aliases", [])
                if "value" not in value or not isinstance(aliases, list):
                    raise RecordError(key, "an answer object needs a 'value' and may list "
                                           "'aliases', as TriviaQA writes it")
                value = list(dict.fromkeys([value["value"], *aliases]))
            if not isinstance(value, list):
                return (_answer_text(value, key),)
            if not value:
                raise RecordError(key, "must list at least one answer")
            return tuple(_answer_text(v, f"{key}[{i}]") for i, v in enumerate(value))
    if "solution" in record:
        if not isinstance(record["solution"], str):
            raise RecordError("solution", "must be a string")
        boxed = extract_boxed(record["solution"])
        if boxed is None:
            raise RecordError("solution", "has no \\boxed{...} final answer; add one, or give "
                                          "the answer in an answer field")
        return (boxed,)
    raise RecordError("answers", f"missing: expected one of the fields {' / '.join(ANSWER_KEYS)}"
                                 f" / solution (with \\boxed{{}})")


def parse_task(record, default_id: str, task_type: str | None = None) -> Task:
    """One task record. `task_type` (the environment of the task set the file is read for) is
    its type; without it the record's own `type` field is. Raises `RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(None, "each line must be a JSON object")
    key = next((k for k in QUESTION_KEYS if k in record), None)
    if key is None:
        seen = ", ".join(list(record)[:12]) or "none"
        raise RecordError(None, f"not a task layout this reads (keys: {seen}); expected "
                                f"{LAYOUTS}")
    question = record[key]
    if not isinstance(question, str) or not question.strip():
        raise RecordError(key, "must be a non-empty string")
    answers = _answers(record)
    kind = task_type if task_type is not None else record.get("type")
    if kind is None:
        raise RecordError("type", "missing: give each record a type (the environment that "
                                  "plays it), or read the file as a task set of the recipe, "
                                  "whose environment gives it")
    if not isinstance(kind, str) or not _TYPE_NAME.fullmatch(kind):
        raise RecordError("type", f"must be an environment name such as search or math, got "
                                  f"{json.dumps(kind)[:60]}")
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise RecordError("meta", "must be an object")
    return Task(_record_id(record, TASK_ID_KEYS, default_id), kind, question.strip(), answers,
                meta)


def parse_document(record) -> Document:
    """One corpus record: `{id, title, text}` (BEIR's `_id` too), or Search-R1's
    `{id, contents}` with the title in quotes on the first line of `contents`. Raises
    `RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(None, "each line must be a JSON object")
    doc_id = _record_id(record, DOCUMENT_ID_KEYS, None)
    if "contents" in record and "text" not in record:
        if not isinstance(record["contents"], str):
            raise RecordError("contents", "must be a string")
        title, _, text = record["contents"].partition("\n")
        return Document(doc_id, title.strip().strip('"'), text)
    title, text = record.get("title", ""), record.get("text")
    if not isinstance(text, str):
        raise RecordError("text", "missing or not a string: expected {id, title, text} or "
                                  "{id, contents}")
    if not isinstance(title, str):
        raise RecordError("title", "must be a string")
    if not text.strip():
        raise RecordError("text", "is empty: a passage needs text")
    return Document(doc_id, title, text)


def read_tasks(path: str | Path, task_type: str | None = None,
               skipped: list | None = None) -> Iterator[Task]:
    """Tasks of a JSONL file (or `.jsonl.gz`), streamed; `task_type`: see `parse_task`. Ids
    default to `<file stem>-<line>` and must be unique in the file. With `skipped` (a list),
    records that do not parse are appended to it as `DataFileError`s instead of raised."""
    path = Path(path)
    stem = Path(path.name.removesuffix(".gz")).stem
    yield from read_unique(path, lambda r, line: parse_task(r, f"{stem}-{line}", task_type),
                           "task", skipped)


def read_corpus(path: str | Path, skipped: list | None = None) -> Iterator[Document]:
    """Documents of a JSONL corpus, streamed; ids must be unique in the file. `skipped`: as
    for `read_tasks`."""
    yield from read_unique(path, lambda r, line: parse_document(r), "document", skipped)


def write_tasks(tasks: Iterable[Task], path: str | Path) -> None:
    write_lines((json_line(t.to_dict()) for t in tasks), path)


def write_corpus(documents: Iterable[Document], path: str | Path) -> None:
    write_lines((json_line(d.to_dict()) for d in documents), path)
