"""A BM25 index of a passage corpus, built once by streaming the corpus and memory-mapped by
every process that searches it (`envs.retriever`). The scores are bm25s's (Lucene BM25, k1 1.5,
b 0.75, its tokenizer: lower case, words of two or more characters, English stop words dropped,
Snowball stems), to the bit, and the directory is a bm25s index that `bm25s.BM25.load` reads:

    params.index.json  vocab.index.json           bm25s's parameters and vocabulary (stem -> id)
    data.csc.index.npy  indices.csc.index.npy  indptr.csc.index.npy
                                                  the score matrix, one column per stem
    passages.jsonl  passages.offsets.npy          the passages ({id, title, text}, one line each)
                                                  and the byte offset of each line
    foresight_index.json                          what it was built from: the corpus files (size,
                                                  mtime), the sha256 of their records, counts

Why not `bm25s.BM25.index`: it takes the whole tokenized corpus as Python lists (about 2 GB per
million passages, and Wikipedia has 21 million) and scores it in a Python loop. Here the corpus
is read once, record by record: token ids go to a file on disk, then two passes over that file
in chunks (document frequencies, then scores) write the matrix straight into memory-mapped
`.npy` files. Memory stays flat in the corpus size, apart from the vocabulary."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megatron_foresight.data.records import (
    DataFileError, RecordError, iter_record_bytes, json_line, parse_json, record_files,
)
from megatron_foresight.tasks import Document
from megatron_foresight.data.task_files import parse_document
from megatron_foresight.errors import UsageError

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "foresight_index.json"
PASSAGES, OFFSETS = "passages.jsonl", "passages.offsets.npy"
K1, B = 1.5, 0.75  # bm25s's defaults (method "lucene")
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_CHUNK_TOKENS = 1 << 22  # token ids per pass-2 chunk: ~100 MB of working arrays


class Bm25Tokenizer:
    """A text as bm25s.tokenize(..., stopwords="en", stemmer=Stemmer("english")) reads it,
    one text at a time (stems cached per word)."""

    def __init__(self):
        import Stemmer
        from bm25s.tokenization import _infer_stopwords

        self._stop = frozenset(_infer_stopwords("en"))
        self._stem = Stemmer.Stemmer("english").stemWord
        self._split = re.compile(TOKEN_PATTERN).findall
        self._cache: dict[str, str] = {}

    def __call__(self, text: str) -> list[str]:
        out = []
        for word in self._split(text.lower()):
            if word in self._stop:
                continue
            stem = self._cache.get(word)
            if stem is None:
                stem = self._cache[word] = self._stem(word)
            out.append(stem)
        return out


def passage_text(doc: Document) -> str:
    """What is indexed of a passage: its title and its text."""
    return f"{doc.title}\n{doc.text}"


# ----------------------------------------------------------------------------------------------
# writing an index


class _Stream:
    """Appends fixed-size numbers to a file through a buffer."""

    def __init__(self, path: Path, typecode: str):
        self.path, self.f, self.buf, self.count = path, path.open("wb"), array(typecode), 0

    def extend(self, values) -> None:
        self.buf.extend(values)
        if len(self.buf) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        self.count += len(self.buf)
        self.buf.tofile(self.f)
        del self.buf[:]

    def close(self) -> int:
        self.flush()
        self.f.close()
        return self.count


def write_index(documents: Iterable[Document], out: Path) -> int:
    """Index `documents` into the (existing, empty) directory `out`; returns how many.
    Everything but the manifest is written."""
    tokenize = Bm25Tokenizer()
    vocab: dict[str, int] = {}
    tokens, lengths = _Stream(out / "tokens.tmp", "i"), _Stream(out / "lengths.tmp", "i")
    offsets = _Stream(out / "offsets.tmp", "q")
    with (out / PASSAGES).open("wb") as passages:
        for doc in documents:
            offsets.extend((passages.tell(),))
            passages.write(json_line(doc.to_dict()).encode("utf-8") + b"\n")
            ids = [vocab.setdefault(stem, len(vocab)) for stem in tokenize(passage_text(doc))]
            tokens.extend(ids)
            lengths.extend((len(ids),))
        offsets.extend((passages.tell(),))
    n_docs, n_tokens = lengths.close(), tokens.close()
    offsets.close()
    np.save(out / OFFSETS, np.fromfile(out / "offsets.tmp", dtype=np.int64))
    if n_docs == 0:
        raise UsageError("the corpus has no passages")
    _write_scores(out, n_docs, n_tokens, len(vocab))
    vocab[""] = len(vocab)  # bm25s's empty token (create_empty_token): no column of its own
    (out / "vocab.index.json").write_text(json.dumps(vocab, ensure_ascii=False),
                                          encoding="utf-8")
    import bm25s

    (out / "params.index.json").write_text(json.dumps(dict(
        k1=K1, b=B, delta=0.5, method="lucene", idf_method="lucene", dtype="float32",
        int_dtype="int32", num_docs=n_docs, version=bm25s.__version__, backend="numpy"),
        indent=4))
    for tmp in ("tokens.tmp", "lengths.tmp", "offsets.tmp", "pairs.tmp"):
        (out / tmp).unlink(missing_ok=True)
    return n_docs


def _pairs(tokens: np.ndarray, lengths: np.ndarray, n_vocab: int) -> Iterator[tuple]:
    """(documents, stems, term frequencies) of the distinct (document, stem) pairs, in
    document order and stem order within a document, chunk by chunk."""
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    doc = 0
    while doc < len(lengths):
        end = int(np.searchsorted(starts, starts[doc] + _CHUNK_TOKENS, side="right")) - 1
        end = max(end, doc + 1)
        chunk = np.asarray(tokens[starts[doc]:starts[end]], dtype=np.int64)
        local = np.repeat(np.arange(end - doc, dtype=np.int64), lengths[doc:end])
        keys, tf = np.unique(local * n_vocab + chunk, return_counts=True)
        yield (keys // n_vocab + doc).astype(np.int32), (keys % n_vocab).astype(np.int64), tf
        doc = end


def _write_scores(out: Path, n_docs: int, n_tokens: int, n_vocab: int) -> None:
    """bm25s's score matrix (`build_index_from_ids`, method lucene), written column by column
    into memory-mapped files. The arithmetic is bm25s's, in the same order and precision."""
    tokens = np.memmap(out / "tokens.tmp", dtype=np.int32, mode="r", shape=(n_tokens,)) \
        if n_tokens else np.zeros(0, np.int32)
    lengths = np.fromfile(out / "lengths.tmp", dtype=np.int32).astype(np.int64)
    df = np.zeros(n_vocab, dtype=np.int64)
    with (out / "pairs.tmp").open("wb") as f:  # pass 1: document frequencies
        for docs, stems, tf in _pairs(tokens, lengths, n_vocab):
            df += np.bincount(stems, minlength=n_vocab)
            np.stack([docs.astype(np.int64), stems, tf]).T.astype(np.int32).tofile(f)
    nnz = int(df.sum())
    indptr = np.zeros(n_vocab + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    np.save(out / "indptr.csc.index.npy", indptr)
    if nnz == 0:  # no passage has a word that is not a stop word
        np.save(out / "data.csc.index.npy", np.zeros(0, np.float32))
        np.save(out / "indices.csc.index.npy", np.zeros(0, np.int32))
        return
    idf = np.array([math.log(1 + (n_docs - d + 0.5) / (d + 0.5)) for d in df.tolist()],
                   dtype=np.float32)
    avg_doc_len = lengths.mean()
    data = np.lib.format.open_memmap(out / "data.csc.index.npy", "w+", np.float32, (nnz,))
    indices = np.lib.format.open_memmap(out / "indices.csc.index.npy", "w+", np.int32, (nnz,))
    filled = np.zeros(n_vocab, dtype=np.int64)
    pairs = np.memmap(out / "pairs.tmp", dtype=np.int32, mode="r", shape=(nnz, 3))
    for start in range(0, nnz, _CHUNK_TOKENS):  # pass 2: scores, placed column by column
        docs, stems, tf = (np.asarray(c) for c in pairs[start:start + _CHUNK_TOKENS].T)
        stems = stems.astype(np.int64)
        l_d = lengths[docs].astype(np.float64)
        tf = tf.astype(np.float32)
        tfc = tf / (K1 * ((1 - B) + B * l_d / avg_doc_len) + tf)
        score = (idf[stems] * tfc).astype(np.float32)
        order = np.argsort(stems, kind="stable")  # documents stay ascending within a stem
        stems, docs, score = stems[order], docs[order], score[order]
        run_starts = np.flatnonzero(np.diff(stems, prepend=-1))
        run_lengths = np.diff(np.append(run_starts, len(stems)))
        rank = np.arange(len(stems)) - np.repeat(run_starts, run_lengths)
        where = indptr[stems] + filled[stems] + rank
        data[where], indices[where] = score, docs
        filled[stems[run_starts]] += run_lengths
    data.flush()
    indices.flush()
    del data, indices, pairs, tokens


# ----------------------------------------------------------------------------------------------
# from corpus files, with a manifest


def corpus_files(corpus: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files of a corpus given as a file, a directory of shards, or a list of those."""
    paths = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    if not paths:
        raise UsageError("no corpus given")
    return [f for p in paths for f in record_files(p)]


def _stat(files: list[Path]) -> list[dict]:
    return [{"path": str(f.resolve()), "bytes": f.stat().st_size,
             "mtime_ns": f.stat().st_mtime_ns} for f in files]


def _documents(files: list[Path], digest, skipped: list, skip_bad: bool,
               progress: bool) -> Iterator[Document]:
    """The passages of `files` in order, hashing each record's bytes into `digest`."""
    compressed = any(f.suffix == ".gz" for f in files)
    total = None if compressed else sum(f.stat().st_size for f in files)
    bar = tqdm(total=total, desc="indexing corpus", unit="B", unit_scale=True, mininterval=2,
               disable=None if progress else True)
    for file in files:
        for path, where, raw in iter_record_bytes(file):
            digest.update(raw + b"\n")
            bar.update(len(raw) + 1)
            try:
                try:
                    yield parse_document(parse_json(raw, path, where))
                except RecordError as e:
                    raise DataFileError(path, where, e.field, e.message) from None
            except DataFileError as e:
                if not skip_bad:
                    raise
                if len(skipped) < 5:
                    log.warning("skipped %s", e)
                skipped.append(str(e))
    bar.close()


def build_index(corpus, out: str | Path, skip_bad: bool = False, progress: bool = True) -> dict:
    """Index the corpus files into `out` (replacing an index there; refusing a directory that
    holds anything else) and return the manifest. Built in a sibling directory and renamed,
    so a crash never leaves half an index."""
    files, out = corpus_files(corpus), Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UsageError(f"{out} exists and is not a corpus index; choose an empty or new "
                         "directory")
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started, digest, skipped = time.perf_counter(), hashlib.sha256(), []
    try:
        n = write_index(_documents(files, digest, skipped, skip_bad, progress), tmp)
        manifest = {"format": FORMAT, "files": _stat(files), "sha256": digest.hexdigest(),
                    "passages": n, "skipped": len(skipped), "k1": K1, "b": B,
                    "tokenizer": {"pattern": TOKEN_PATTERN, "stopwords": "en",
                                  "stemmer": "english"},
                    "build_seconds": round(time.perf_counter() - started, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if skipped:
        log.warning("skipped %d passage(s) that do not read (first: %s)", len(skipped),
                    skipped[0])
    log.info("indexed %d passages into %s in %.1f s", n, out, manifest["build_seconds"])
    return manifest


def _replace_dir(new: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(index: Path) -> dict | None:
    try:
        manifest = json.loads((Path(index) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def content_sha256(files: list[Path]) -> str:
    """The sha256 an index records of its corpus: every record's bytes, in order."""
    digest = hashlib.sha256()
    for file in files:
        for _, _, raw in iter_record_bytes(file):
            digest.update(raw + b"\n")
    return digest.hexdigest()


def matches(index: Path, files: list[Path], by_content: bool = True) -> bool:
    """Whether the index in `index` was built from exactly these files' contents: by size and
    mtime, else (a copied or touched corpus; with `by_content`) by the content hash, which then
    refreshes the recorded sizes and times."""
    manifest = read_manifest(index)
    if manifest is None:
        return False
    stat = _stat(files)
    if manifest["files"] == stat:
        return True
    same_sizes = [(f["path"], f["bytes"]) for f in manifest["files"]] == \
        [(f["path"], f["bytes"]) for f in stat]
    if not (by_content and same_sizes) or content_sha256(files) != manifest["sha256"]:
        return False  # hashing (minutes for Wikipedia) only when nothing but times changed
    manifest["files"] = stat
    tmp = Path(index) / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, Path(index) / MANIFEST)  # other ranks may be reading it
    return True


def cached_index_dir(files: list[Path], cache_dir: Path) -> Path:
    """Where the cache keeps the index of these corpus files."""
    key = hashlib.sha256(json.dumps([str(f.resolve()) for f in files]).encode()).hexdigest()
    name = Path(files[0].name.removesuffix(".gz")).stem
    return Path(cache_dir) / "retrieval" / f"{name}-{key[:12]}"


def ensure_index(corpus, cache_dir: Path, skip_bad: bool = False, progress: bool = True,
                 poll_seconds: float = 5.0) -> Path:
    """The index of `corpus` in the cache, built there on first use (and again when the
    corpus changed) by rank 0; the other ranks wait for it by watching the files rather than
    in a collective, which would time out while a large corpus is indexed."""
    from megatron_foresight.runtime.dist import is_rank0

    files = corpus_files(corpus)
    where = cached_index_dir(files, cache_dir)
    failed = where.with_name(where.name + ".failed")  # how rank 0 tells the others it failed
    if is_rank0():
        failed.unlink(missing_ok=True)
        if not matches(where, files):
            log.info("indexing %s into %s (built once; later runs reuse it)",
                     ", ".join(map(str, files)), where)
            try:
                build_index(files, where, skip_bad=skip_bad, progress=progress)
            except BaseException as e:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{type(e).__name__}: {e}"[:2000])
                raise
        return where
    return _wait_for_index(where, files, failed, poll_seconds)


def _wait_for_index(where: Path, files: list[Path], failed: Path, poll_seconds: float) -> Path:
    """Another rank's wait for rank 0's index (the cache must be on a filesystem all ranks
    see): polled often at first (a cached index is found at once), then every poll_seconds."""
    waited, pause, reported = 0.0, 0.2, 0.0
    while not matches(where, files, by_content=False):
        if failed.exists():
            raise UsageError(f"rank 0 could not index the corpus into {where}: "
                             f"{failed.read_text()}")
        if waited - reported >= 60:
            log.info("waiting for rank 0 to index the corpus into %s (%.0f s)", where, waited)
            reported = waited
        time.sleep(pause)
        waited += pause
        pause = min(pause * 2, poll_seconds)
    return where
