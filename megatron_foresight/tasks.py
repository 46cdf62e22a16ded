"""The records every layer shares: a task (a question and its reference answers, typed by the
environment that plays it) and a document of a corpus. Reading them from users' files is
`data.task_files`'."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    id: str
    type: str
    question: str
    answers: tuple[str, ...]
    meta: dict | None = None
    task_set: str | None = None
    """The recipe's task set it was read for (`envs.tasksets`); not part of the file."""

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

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "text": self.text}
