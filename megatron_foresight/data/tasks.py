"""Tasks (a question and its reference answers) and corpora (documents for the retriever) from
users' JSONL files. Reads the usual public layouts: NQ / HotpotQA (`question`, `answer(s)`),
Search-R1 (`golden_answers`; corpus `contents` = '"Title"\\ntext'), GSM8K (`answer` ending in
`#### 72`) and MATH (`problem`, `solution` with `\\boxed{...}`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from megatron_foresight.data.records import RecordError, read_unique

TASK_TYPES = ("search", "math")


@dataclass(frozen=True)
class Task:
    id: str
    type: str
    question: str
    answers: tuple[str, ...]
    meta: dict | None = None

    def to_dict(self) -> dict:
        out = {"id": self.id, "type": self.type, "question": self.question,
               "answers": list(self.answers)}
        if self.meta is not None:
            out["meta"] = self.meta
        return out


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


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
    for key in ("answers", "golden_answers", "answer"):
        if key in record:
            value = record[key]
            values = value if isinstance(value, list) else [value]
            if not values:
                raise RecordError(key, "must list at least one answer")
            return tuple(_answer_text(v, key) for v in values)
    if "solution" in record:
        boxed = last_boxed(str(record["solution"]))
        if boxed is None:
            raise RecordError("solution", "has no \\boxed{...} final answer")
        return (boxed,)
    raise RecordError("answers", "missing: expected one of the fields answers / golden_answers "
                                 "/ answer / solution (with \\boxed{})")


def parse_task(record, default_id: str, task_type: str | None = None) -> Task:
    """One task record; `task_type` applies when it has no `type`. Raises `RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(None, "each line must be a JSON object")
    question = next((record[k] for k in ("question", "problem", "query") if k in record), None)
    if not isinstance(question, str) or not question.strip():
        raise RecordError("question", "missing or empty: expected a string in one of the "
                                      "fields question / problem / query")
    answers = _answers(record)
    kind = record.get("type", task_type)
    if kind is None:
        raise RecordError("type", f"missing: add a type field ({' or '.join(TASK_TYPES)}) or "
                                  "say which environment the file is for")
    if kind not in TASK_TYPES:
        raise RecordError("type", f"must be one of {', '.join(TASK_TYPES)}, got {kind!r}")
    task_id = str(next((record[k] for k in ("id", "_id", "task_id") if k in record),
                       default_id))
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise RecordError("meta", "must be an object")
    return Task(task_id, kind, question.strip(), answers, meta)


def parse_document(record) -> Document:
    """One corpus record: `{id, title, text}`, or Search-R1's `{id, contents}` with the title
    in quotes on the first line of `contents`. Raises `RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(None, "each line must be a JSON object")
    if "id" not in record:
        raise RecordError("id", "missing: each document needs an id")
    if "contents" in record and "text" not in record:
        if not isinstance(record["contents"], str):
            raise RecordError("contents", "must be a string")
        title, _, text = record["contents"].partition("\n")
        return Document(str(record["id"]), title.strip().strip('"'), text)
    title, text = record.get("title", ""), record.get("text")
    if not isinstance(text, str):
        raise RecordError("text", "missing or not a string: expected {id, title, text} or "
                                  "{id, contents}")
    if not isinstance(title, str):
        raise RecordError("title", "must be a string")
    return Document(str(record["id"]), title, text)


def read_tasks(path: str | Path, task_type: str | None = None) -> Iterator[Task]:
    """Tasks of a JSONL file, streamed; ids default to `<file stem>-<line>`."""
    path = Path(path)
    yield from read_unique(path, lambda r, line: parse_task(r, f"{path.stem}-{line}",
                                                                task_type), "task")


def read_corpus(path: str | Path) -> Iterator[Document]:
    """Documents of a JSONL corpus, streamed."""
    yield from read_unique(path, lambda r, line: parse_document(r), "document")


def _write_lines(lines: Iterable[str], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def write_tasks(tasks: Iterable[Task], path: str | Path) -> None:
    _write_lines((json.dumps(t.to_dict(), ensure_ascii=False) for t in tasks), path)


def write_corpus(documents: Iterable[Document], path: str | Path) -> None:
    _write_lines((json.dumps({"id": d.id, "title": d.title, "text": d.text}, ensure_ascii=False)
                  for d in documents), path)
