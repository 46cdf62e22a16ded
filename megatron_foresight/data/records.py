"""Users' record files: JSONL files (gzip-compressed too: `.jsonl.gz`), webdataset `.tar` shards
and directories of shards (`.tar`, or `.jsonl` / `.jsonl.gz` parts), read as a stream of records, with errors that name the file, the line (or tar member) and the field;
and the atomic line writer every record file is written with."""

from __future__ import annotations

import codecs
import gzip
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

from megatron_foresight.errors import UsageError

# A line number (JSONL) or a member name (tar shard).
Location = int | str


class DataFileError(ValueError):
    """A problem in a user's data file, located by file, line (or tar member) and field."""

    def __init__(self, path: str | Path, line: Location | None, field: str | None,
                 message: str):
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


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"file not found: {path}")


SHARD_PATTERNS = (("*.tar",), ("*.jsonl", "*.jsonl.gz"))


def record_files(path: str | Path) -> list[Path]:
    """The files of a record input: the file itself, or a directory's shards in name order
    (`.tar` shards, else `.jsonl` and `.jsonl.gz` parts). A missing input raises
    `UsageError`."""
    path = Path(path)
    if path.is_dir():
        for patterns in SHARD_PATTERNS:
            shards = sorted(p for pattern in patterns for p in path.glob(pattern) if p.is_file())
            if shards:
                return shards
        raise UsageError(f"{path}: the directory holds no shards (*.tar, *.jsonl, *.jsonl.gz)")
    _check_file(path)
    return [path]


def open_binary(path: Path):
    """A file for reading bytes, decompressed when its name ends in `.gz`."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its line ending) of the non-blank lines. Read as bytes so
    that one badly encoded line is that line's error, not the whole file's."""
    lineno = 0
    try:
        with open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if lineno == 1 and line.startswith(codecs.BOM_UTF8):  # files saved by Notepad
                    line = line[len(codecs.BOM_UTF8):]
                if line.strip():
                    yield lineno, line.rstrip(b"\r\n")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # only .gz files raise these
        raise DataFileError(path, lineno + 1, None, f"not a readable gzip file ({e}); "
                                                    "compress it again") from None


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, content) of the `.json` members of a shard, streamed."""
    last = "(start of archive)"
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    last = member.name
                    yield member.name, tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise DataFileError(path, last, None, f"not a readable tar archive after this member "
                                              f"({e}); write the shard again") from None


def iter_record_bytes(path: str | Path) -> Iterator[tuple[Path, Location, bytes]]:
    """(file, line number or tar member, raw bytes) of every record of a JSONL file, a
    webdataset `.tar` shard (its `.json` members) or a directory of shards, streamed; blank
    lines are skipped. A missing file raises `UsageError`."""
    for file in record_files(path):
        if file.suffix == ".tar":
            for name, data in _tar_members(file):
                yield file, name, data
        else:
            for lineno, line in _lines(file):
                yield file, lineno, line


def decode(raw: bytes, path: str | Path, location: Location) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(path, location, None, f"not valid UTF-8 (byte {e.start + 1}); "
                                                  f"save the file as UTF-8") from None


def iter_raw(path: str | Path) -> Iterator[tuple[Path, Location, str]]:
    """Like `iter_record_bytes`, with each record's text; bad UTF-8 raises `DataFileError`."""
    for file, where, raw in iter_record_bytes(path):
        yield file, where, decode(raw, file, where)


def parse_json(raw: str | bytes, path: str | Path, location: Location) -> object:
    """One record's JSON; bad UTF-8 or bad JSON raises `DataFileError` (field None)."""
    text = decode(raw, path, location) if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(path, location, None,
                            f"not valid JSON ({e.msg} at column {e.colno})") from None


def iter_records(path: str | Path) -> Iterator[tuple[Path, Location, object]]:
    """Like `iter_record_bytes`, with each record parsed; the first bad one raises
    `DataFileError`."""
    for file, where, raw in iter_record_bytes(path):
        yield file, where, parse_json(raw, file, where)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-blank line of a JSONL file, streamed. A missing
    file raises `UsageError`; a line that is not JSON raises `DataFileError`."""
    path = Path(path)
    _check_file(path)
    for lineno, line in _lines(path):
        yield lineno, parse_json(line, path, lineno)


def check_first_records(path: str | Path, parse: Callable, count: int = 3) -> None:
    """Parse the first `count` records of `path` with `parse(record)`: what the checks before
    a run read of a file (it exists, its layout is one this reads). The first problem raises
    `DataFileError` (a missing file `UsageError`)."""
    for n, (file, where, record) in enumerate(iter_records(path)):
        try:
            parse(record)
        except RecordError as e:
            raise DataFileError(file, where, e.field, e.message) from None
        if n + 1 == count:
            return


def first_seen(file: Path, where: Location) -> str:
    """Where a record was, for 'duplicate id' messages."""
    return f"line {where}" if isinstance(where, int) else f"{file.name}:{where}"


def read_unique(path: str | Path, parse: Callable, kind: str,
                skipped: list | None = None) -> Iterator:
    """Items `parse(record, location)` of every record of `path` (each has an `id`, unique in
    the input), streamed; the first problem raises `DataFileError`, or, with `skipped` (a
    list), is appended to it and the record left out. Holds the ids seen, and nothing else, in
    memory."""
    seen: dict[str, str] = {}
    for file, where, raw in iter_record_bytes(path):
        try:
            try:
                item = parse(parse_json(raw, file, where), where)
            except RecordError as e:
                raise DataFileError(file, where, e.field, e.message) from None
            if item.id in seen:
                raise DataFileError(file, where, "id", f"duplicate {kind} id {item.id!r} (first "
                                                       f"at {seen[item.id]}); ids must be unique")
        except DataFileError as e:
            if skipped is None:
                raise
            skipped.append(e)
            continue
        seen[item.id] = first_seen(file, where)
        yield item


def json_line(obj) -> str:
    """The one canonical JSON form of every record file written here (compact, UTF-8 kept),
    so the same data always gives byte-identical files."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_lines(lines: Iterable[str], path: str | Path) -> None:
    """`lines`, each ending in a newline, to `path` through `path.tmp` and a rename, so a reader
    never sees half a file and a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def text_of(record) -> str:
    """The `text` field of a plain-text document record; raises `RecordError`."""
    if not isinstance(record, dict) or "text" not in record:
        raise RecordError("text", "missing: each line must be an object with a 'text' string")
    if not isinstance(record["text"], str):
        raise RecordError("text", f"must be a string, got {type(record['text']).__name__}")
    return record["text"]
