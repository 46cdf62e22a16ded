"""`foresight data validate`: read a file to the end and report every problem in it (file,
line, field, what is wrong) with counts by field, instead of stopping at the first."""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from megatron_foresight.data.records import DataFileError, RecordError, iter_raw, parse_json
from megatron_foresight.data.tasks import parse_document, parse_task
from megatron_foresight.data.trajectory import Trajectory
from megatron_foresight.errors import UsageError

KINDS = ("trajectories", "tasks", "corpus")
PARSERS = {
    "trajectories": lambda record, where, path: Trajectory.from_dict(record),
    "tasks": lambda record, where, path: parse_task(record, f"{Path(path).stem}-{where}",
                                                    "search"),
    "corpus": lambda record, where, path: parse_document(record),
}


def detect_kind(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if "schema" in record:
        return "trajectories"
    if any(k in record for k in ("question", "problem", "query")):
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
        return Counter(re.sub(r"\[\d+\]", "[]", p.field or "(record)") for p in self.problems)

    def format(self, max_listed: int = 50) -> str:
        lines = [str(p) for p in self.problems[:max_listed]]
        if len(self.problems) > max_listed:
            lines.append(f"... and {len(self.problems) - max_listed} more")
        if self.problems:
            by_field = ", ".join(f"{n} in {f}" for f, n in self.counts().most_common())
            lines.append(f"{self.path}: {self.records} records ({self.kind}), "
                         f"{len(self.problems)} problems ({by_field})")
        else:
            lines.append(f"{self.path}: {self.records} records ({self.kind}), no problems")
        return "\n".join(lines)


def validate_file(path: str | Path, kind: str | None = None) -> Report:
    """Every problem of a .jsonl file, .tar shard or directory of shards holding `kind`
    records (None: detected from the first record)."""
    report = Report(str(path), kind)
    seen: dict[str, object] = {}
    for file, where, text in iter_raw(path):
        report.records += 1
        try:
            record = parse_json(text, file, where)
        except DataFileError as e:
            report.problems.append(e)
            continue
        if report.kind is None:
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
                file, where, "id", f"duplicate id {item.id!r} (first at line {seen[item.id]})"))
        else:
            seen[item.id] = where
    return report


def main(paths: list[str], kind: str | None = None) -> int:
    """Print a report per file; 0 when all are clean, 1 when any has a problem."""
    status = 0
    for path in paths:
        if not Path(path).exists():
            raise UsageError(f"file not found: {path}")
        report = validate_file(path, kind)
        print(report.format())
        status = max(status, 1 if report.problems else 0)
    sys.stdout.flush()
    return status
