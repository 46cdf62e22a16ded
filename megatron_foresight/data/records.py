"""Reading users' record files: errors that name the file, the line (or tar member) and the
field, and a streaming JSONL reader."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from megatron_foresight.errors import UsageError


class DataFileError(ValueError):
    """A problem in a user's data file, located by file, line (or tar member) and field."""

    def __init__(self, path, line, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = f"{path}:{line}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        return DataFileError, (self.path, self.line, self.field, self.message)


class RecordError(ValueError):
    """A problem in one record, raised by a parser that does not know the file; the reader
    turns it into a `DataFileError`. `field` is a dotted path such as `turns[3].role`."""

    def __init__(self, field: str | None, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self):
        return RecordError, (self.field, self.message)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise UsageError(f"{path}: directory holds no .tar shards")
        return shards
    if not path.is_file():
        raise UsageError(f"file not found: {path}")
    return [path]


def iter_raw(path: str | Path) -> Iterator[tuple[Path, object, str]]:
    """(file, line number or tar member, text) of every record of a JSONL file, a webdataset
    .tar shard (its `.json` members) or a directory of shards, streamed; blank lines skipped."""
    for file in _files(Path(path)):
        if file.suffix == ".tar":
            with tarfile.open(file, "r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".json"):
                        yield file, member.name, tar.extractfile(member).read().decode("utf-8")
            continue
        with file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield file, lineno, line


def iter_records(path: str | Path) -> Iterator[tuple[Path, object, object]]:
    """Like `iter_raw`, with each record parsed; a JSON syntax error raises `DataFileError`."""
    for file, where, text in iter_raw(path):
        yield file, where, parse_json(text, file, where)


def parse_json(text: str, path, location) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(path, location, None,
                            f"not valid JSON ({e.msg} at column {e.colno})") from None


def read_unique(path: str | Path, parse: Callable, kind: str) -> Iterator:
    """Items `parse(record, line)` of every record of `path` (each has an `id`, unique in the
    input), streamed; the first problem raises `DataFileError`."""
    seen: set[str] = set()
    for file, where, record in iter_records(path):
        try:
            item = parse(record, where)
        except RecordError as e:
            raise DataFileError(file, where, e.field, e.message) from None
        if item.id in seen:
            raise DataFileError(file, where, "id", f"duplicate {kind} id {item.id!r}")
        seen.add(item.id)
        yield item
