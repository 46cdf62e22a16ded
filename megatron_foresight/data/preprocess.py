"""`foresight data preprocess` / `tools/preprocess_data.py`: trajectories (JSONL, webdataset
shards) or plain-text documents, rendered by a named renderer and tokenized by several worker
processes, into a Megatron-Core indexed dataset plus its segment-type stream:

    PREFIX.bin / PREFIX.idx                     token ids, one document per record
    PREFIX_segments.bin / PREFIX_segments.idx   one segment type (`render.Seg`) per token
    PREFIX.json                                 what was read, how, and token counts by type

Input is streamed and at most a few batches are in flight, so memory stays flat however large
the input. The output keeps the input's order whatever the number of workers. A bad record
stops the run with its file, line and field, and leaves no partial output behind."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import signal
import socket
import threading
from collections import Counter, deque
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from megatron_foresight.data.records import DataFileError, RecordError, iter_raw, text_of
from megatron_foresight.data.render import TEXT_RENDERER, Seg, get_renderer
from megatron_foresight.data.tokenizer import TokenizerConfig, build_tokenizer, episode_prompt
from megatron_foresight.data.trajectory import Trajectory
from megatron_foresight.errors import UsageError

SEGMENTS_SUFFIX = "_segments"

log = logging.getLogger(__name__)

# (file, line or tar member, raw record text, whether the record is JSON)
Item = tuple[str, object, str, bool]


def _input_files(inputs: list[str | Path]) -> list[Path]:
    for p in map(Path, inputs):
        if p.is_file() and p.suffix not in (".jsonl", ".tar", ".txt"):
            raise UsageError(f"{p}: expected a .jsonl file, .tar shards or a .txt file")
        if not p.exists():
            raise UsageError(f"input not found: {p}")
    return [Path(p) for p in inputs]


def _raw_records(inputs: list[Path]) -> Iterator[tuple[Item, int]]:
    """Each record with about the number of input bytes it used (for the progress bar)."""
    for path in inputs:
        for file, where, text in iter_raw(path):
            yield (str(file), where, text.rstrip("\n"), file.suffix != ".txt"), len(text) + 1


class _Encoder:
    """Renders and tokenizes records; one per worker process."""

    def __init__(self, renderer: str, tokenizer: dict):
        self.renderer = renderer
        self.render = None if renderer == TEXT_RENDERER else get_renderer(renderer)
        self.tokenizer = build_tokenizer(TokenizerConfig(**tokenizer))

    def segments(self, item: Item) -> list[tuple[str, Seg]]:
        _, _, raw, is_json = item
        if not is_json:
            return [(raw, Seg.TEXT)]
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RecordError(None, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if self.render is None:
            return [(text_of(record), Seg.TEXT)]
        return [(self.prompt_text(text) if seg == Seg.PROMPT else text, seg)
                for text, seg in self.render(Trajectory.from_dict(record))]

    def prompt_text(self, text: str) -> str:
        """A prompt segment is the task prompt and a newline (`render.transcript`): what
        `episode_prompt` makes of the prompt without a chat template. With one, it is that
        function's chat opening instead, as in the agent loop."""
        if not getattr(self.tokenizer, "chat_template", False):
            return text
        return episode_prompt(self.tokenizer, text.removesuffix("\n"))

    def encode(self, batch: list[Item]):
        tokens, types, lengths = [], [], []
        for item in batch:
            try:
                segments = self.segments(item)
            except RecordError as e:
                return "error", (item[0], item[1], e.field, e.message)
            doc_tokens, doc_types = [], []
            for text, seg in segments:
                ids = self.tokenizer.encode(text)
                doc_tokens += ids
                doc_types += [int(seg)] * len(ids)
            doc_tokens.append(self.tokenizer.eod)
            doc_types.append(int(segments[-1][1]))
            tokens += doc_tokens
            types += doc_types
            lengths.append(len(doc_tokens))
        return "ok", (np.asarray(tokens, np.int32), np.asarray(types, np.uint8),
                      np.asarray(lengths, np.int64))


_WORKER: _Encoder | None = None


def _init_worker(renderer: str, tokenizer: dict) -> None:
    global _WORKER
    _WORKER = _Encoder(renderer, tokenizer)


def _encode(batch: list[Item]):
    return _WORKER.encode(batch)


def _batches(records, size: int):
    batch, nbytes = [], 0
    for item, used in records:
        batch.append(item)
        nbytes += used
        if len(batch) == size:
            yield batch, nbytes
            batch, nbytes = [], 0
    if batch:
        yield batch, nbytes


def _encoded(batches, renderer: str, tokenizer: dict, workers: int):
    """(result, input bytes) per batch, in input order."""
    if workers <= 1:
        encoder = _Encoder(renderer, tokenizer)
        for batch, nbytes in batches:
            yield encoder.encode(batch), nbytes
        return
    with get_context("spawn").Pool(workers, _init_worker, (renderer, tokenizer)) as pool:
        in_flight = deque()
        for batch, nbytes in batches:
            in_flight.append((pool.apply_async(_encode, (batch,)), nbytes))
            # A bounded window keeps memory flat (Pool.imap would read the whole input ahead).
            if len(in_flight) >= 2 * workers:
                result, n = in_flight.popleft()
                yield result.get(), n
        while in_flight:
            result, n = in_flight.popleft()
            yield result.get(), n


# What follows PREFIX in a temporary file's name (see `_temp_prefix`).
_TEMP_SUFFIX = re.compile(r"\.tmp(?P<pid>\d+)(?:-(?P<host>[A-Za-z0-9.-]+))?"
                          rf"(?:{SEGMENTS_SUFFIX})?\.(?:bin|idx)")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())


def _temp_prefix(prefix: Path) -> Path:
    """Where this process writes `prefix`'s files until they are complete: PREFIX.tmp<PID>-<HOST>
    (the host, so that on a filesystem several hosts share a run reaps only its own host's)."""
    return prefix.with_name(f"{prefix.name}.tmp{os.getpid()}-{_host()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(prefix: Path) -> None:
    """Remove the temporary files a run writing `prefix` on this host left when it was killed
    (kill -9, out of memory): those whose process no longer exists. Names without a host were
    written by versions before the host was in the name, and are judged by the PID alone."""
    for path in prefix.parent.glob(f"{glob.escape(prefix.name)}.tmp*"):
        match = _TEMP_SUFFIX.fullmatch(path.name[len(prefix.name):])
        if match and match["host"] in (None, _host()) and not _pid_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            log.warning("removed %s: left by process %s, which was killed before it finished",
                        path, match["pid"])


class SegmentedWriter:
    """PREFIX.bin/.idx (tokens) and PREFIX_segments.bin/.idx (segment types), written under
    temporary names. `commit` moves them into place, the token index last (a prefix whose .idx
    exists is complete); leaving the `with` block without committing removes them, and a new
    writer first removes those a killed one left."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.prefix)
        tmp = _temp_prefix(self.prefix)
        self._outputs = {f"{tmp}{s}{ext}": f"{self.prefix}{s}{ext}"
                         for s in ("", SEGMENTS_SUFFIX) for ext in (".bin", ".idx")}
        self._tmp = tmp
        dtype = np.uint16 if vocab_size <= 65536 else np.int32
        try:  # not yet inside a `with` block, whose exit would remove them
            self._tokens = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
            self._types = IndexedDatasetBuilder(f"{tmp}{SEGMENTS_SUFFIX}.bin", dtype=np.uint8)
        except BaseException:
            self._remove_temps()
            raise
        self.counts: Counter = Counter()
        self.documents = 0
        self._committed = False

    def add(self, ids: np.ndarray, segments: np.ndarray, lengths: np.ndarray) -> None:
        """Documents of `lengths` tokens, concatenated in `ids` and `segments`."""
        ends = np.cumsum(lengths)
        for start, end in zip(ends - lengths, ends):
            self._tokens.add_document(ids[start:end], [int(end - start)])
            self._types.add_document(segments[start:end], [int(end - start)])
        self.counts.update(dict(zip(*np.unique(segments, return_counts=True))))
        self.documents += len(lengths)

    def commit(self, meta: dict | None = None) -> None:
        self._tokens.finalize(f"{self._tmp}.idx")
        self._types.finalize(f"{self._tmp}{SEGMENTS_SUFFIX}.idx")
        if meta is not None:
            Path(f"{self.prefix}.json").write_text(json.dumps(meta, indent=1) + "\n",
                                                   encoding="utf-8")
        for src in sorted(self._outputs,
                          key=lambda s: s.endswith(".idx") and SEGMENTS_SUFFIX not in s):
            os.replace(src, self._outputs[src])
        self._committed = True

    def tokens_by_segment(self) -> dict[str, int]:
        return {Seg(int(k)).name.lower(): int(v) for k, v in sorted(self.counts.items())}

    def __enter__(self) -> "SegmentedWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._committed:
            self._tokens.data_file.close()
            self._types.data_file.close()
            self._remove_temps()

    def _remove_temps(self) -> None:
        for path in self._outputs:
            Path(path).unlink(missing_ok=True)


def preprocess(inputs: list[str | Path], output_prefix: str | Path, renderer: str,
               tokenizer: TokenizerConfig, workers: int = 1, batch_size: int = 256,
               progress: bool = True) -> dict:
    """Write the indexed dataset and segment stream of `inputs`; returns the metadata that
    also goes to PREFIX.json."""
    if renderer != TEXT_RENDERER:
        get_renderer(renderer)
    if workers < 1 or batch_size < 1:
        raise UsageError(f"--workers and --batch-size must be at least 1, got {workers} and "
                         f"{batch_size}")
    files = _input_files(inputs)
    tok = build_tokenizer(tokenizer)
    total = sum(f.stat().st_size for p in files
                for f in ([p] if p.is_file() else p.glob("*.tar")))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"preprocess ({renderer})",
               disable=None if progress else True, mininterval=1)
    with _sigterm_exits(), bar, SegmentedWriter(output_prefix, tok.vocab_size) as writer:
        batches = _batches(_raw_records(files), batch_size)
        for (status, payload), nbytes in _encoded(batches, renderer, asdict(tokenizer), workers):
            if status == "error":
                raise DataFileError(*payload)
            writer.add(*payload)
            bar.update(nbytes)
            bar.set_postfix(docs=writer.documents, refresh=False)
        if writer.documents == 0:
            raise UsageError(f"no records in {', '.join(map(str, files))}")
        meta = {"inputs": [str(p) for p in files], "renderer": renderer,
                "tokenizer": tok.describe(), "documents": writer.documents,
                "tokens": int(sum(writer.counts.values())),
                "tokens_by_segment": writer.tokens_by_segment()}
        writer.commit(meta)
    return meta


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM (`kill`, a Slurm time limit) unwinds like Ctrl-C, so the writer removes its
    temporary files on the way out. Only the main thread may set a signal handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _exit(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise SystemExit(128 + signum)
