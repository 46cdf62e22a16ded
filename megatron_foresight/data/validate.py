"""`foresight data validate`: read a file to the end and report every problem in it (file,
line, field, what is wrong) with counts by field, instead of stopping at the first."""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from megatron_foresight.data.records import (
    DataFileError, RecordError, first_seen, iter_record_bytes, parse_json,
)
from megatron_foresight.data.task_files import QUESTION_KEYS, parse_document, parse_task
from megatron_foresight.data.trajectory import Trajectory
from megatron_foresight.errors import UsageError

KINDS = ("trajectories", "tasks", "corpus")
PARSERS = {
    "trajectories": lambda record, where, path: Trajectory.from_dict(record),
    # A task without a `type` is an error only where no type is given for the whole file, which
    # the validator cannot know; "search" stands in so the other fields are still checked.
    "tasks": lambda record, where, path: parse_task(record, f"{Path(path).stem}-{where}",
                                                    "search"),
    "corpus": lambda record, where, path: parse_document(record),
}


def detect_kind(record: dict) -> str | None:
    """What a file holds, told from one of its records; None when it cannot be told."""
    if "schema" in record:
        return "trajectories"
    if any(k in record for k in QUESTION_KEYS):
        return "tasks"
    if "text" in record or "contents" in record:
        return "corpus"
    return None


@dataclass
class Report:
    path: str
    kind: str | None
    records: int = 0
    problems: list[DataFileError] = field(default_factory=list)

    def counts(self) -> Counter:
        """Problems by field, list indices dropped (`turns[3].role` counts as `turns[].role`);
        problems with the whole record (bad JSON, not an object) count as `(record)`."""
        return Counter(re.sub(r"\[\d+\]", "[]", p.field or "(record)") for p in self.problems)

    def format(self, max_listed: int = 50) -> str:
        """Each problem as `file:line: field 'f': message` (at most `max_listed`), then a
        summary line with the counts by field."""
        lines = [str(p) for p in self.problems[:max_listed]]
        if len(self.problems) > max_listed:
            lines.append(f"... and {len(self.problems) - max_listed} more")
        summary = f"{self.path}: {self.records} records" + (f" ({self.kind})" if self.kind
                                                              else "")
        if self.problems:
            by_field = ", ".join(f"{n} in {'field ' + f if f != '(record)' else 'the record'}"
                                 for f, n in self.counts().most_common())
            lines.append(f"{summary}, {len(self.problems)} problems ({by_field})")
        else:
            lines.append(f"{summary}, no problems")
        return "\n".join(lines)


def validate_file(path: str | Path, kind: str | None = None) -> Report:
    """Every problem of a .jsonl file, .tar shard or directory of shards holding `kind`
    records (None: detected from the first record that is an object). Reads to the end."""
    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    report = Report(str(path), kind)
    seen: dict[str, str] = {}
    for file, where, raw in iter_record_bytes(path):
        report.records += 1
        try:
            record = parse_json(raw, file, where)
        except DataFileError as e:
            report.problems.append(e)
            continue
        if report.kind is None:
            if not isinstance(record, dict):
                report.problems.append(DataFileError(file, where, None,
                                                     "each record must be a JSON object"))
                continue
            report.kind = detect_kind(record)
            if report.kind is None:
                raise UsageError(f"{file}:{where}: cannot tell what the file holds; pass "
                                 f"--kind ({', '.join(KINDS)})")
        try:
            item = PARSERS[report.kind](record, where, file)
        except RecordError as e:
            report.problems.append(DataFileError(file, where, e.field, e.message))
            continue
        if item.id in seen:
            report.problems.append(DataFileError(
                file, where, "id", f"duplicate id {item.id!r} (first at {seen[item.id]}); ids "
                                   f"must be unique"))
        else:
            seen[item.id] = first_seen(file, where)
    return report


def main(paths: list[str], kind: str | None = None) -> int:
    """Print a report per file. Returns 0 when every file is clean, 1 when any has a problem,
    2 when one cannot be read at all (missing, not recognised: said on stderr)."""
    status = 0
    for path in paths:
        try:
            report = validate_file(path, kind)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
            continue
        print(report.format())
        if report.problems:
            status = max(status, 1)
    sys.stdout.flush()
    return status
