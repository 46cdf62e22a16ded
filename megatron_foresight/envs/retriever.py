"""BM25 retrieval over a passage corpus (`envs.bm25_index` builds the index; bm25s scores the
queries). An index opened from disk is memory-mapped: every process that searches it shares the
operating system's page cache, so a Wikipedia-scale index costs each rank only the pages its
queries touch."""

from __future__ import annotations

import json
import mmap
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_foresight.tasks import Document
from megatron_foresight.envs.bm25_index import (
    MANIFEST, OFFSETS, PASSAGES, Bm25Tokenizer, write_index,
)
from megatron_foresight.errors import UsageError


class _Passages:
    """Passage i of an index directory, read from the memory-mapped passages file."""

    def __init__(self, index: Path):
        self.offsets = np.load(index / OFFSETS, mmap_mode="r")
        with (index / PASSAGES).open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) \
                if f.seek(0, 2) else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Document:
        record = json.loads(self._map[int(self.offsets[i]):int(self.offsets[i + 1])])
        return Document(record["id"], record["title"], record["text"])


class BM25Retriever:
    """Top-k passages for a query, best first (bm25s's scores and ranking)."""

    def __init__(self, bm25, passages: Sequence[Document]):
        self._bm25, self.passages = bm25, passages
        self._tokenize = Bm25Tokenizer()

    @classmethod
    def open(cls, index: str | Path) -> "BM25Retriever":
        """The index written by `foresight data index` (or the cache), memory-mapped."""
        import bm25s

        index = Path(index)
        if not (index / MANIFEST).is_file():
            raise UsageError(f"{index} is not a corpus index (no {MANIFEST}); build one with "
                             "`foresight data index CORPUS --out DIR`")
        return cls(bm25s.BM25.load(index, mmap=True, load_corpus=False), _Passages(index))

    @classmethod
    def from_documents(cls, documents: Sequence[Document]) -> "BM25Retriever":
        """An index of a corpus held in memory (the built-in world's few hundred documents)."""
        import bm25s

        documents = list(documents)
        with tempfile.TemporaryDirectory(prefix="bm25-") as tmp:
            write_index(documents, Path(tmp))
            bm25 = bm25s.BM25.load(tmp, mmap=False, load_corpus=False)
        return cls(bm25, documents)

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, query: str, k: int) -> list[tuple[Document, float]]:
        """The `k` best passages for `query` with their scores, best first; passages that
        share no term with the query are left out, so the list may be shorter."""
        import bm25s.selection

        k = min(k, len(self.passages))
        stems = self._tokenize(query)
        ids = self._bm25.get_tokens_ids(stems)
        if not ids or k == 0:
            return []
        scores = self._bm25.get_scores_from_ids(ids)
        top_scores, top = bm25s.selection.topk(scores, k, backend="numpy", sorted=True)
        return [(self.passages[int(i)], float(s)) for i, s in zip(top, top_scores) if s > 0]

    def search_batch(self, queries: list[str], k: int) -> list[list[tuple[Document, float]]]:
        return [self.search(q, k) for q in queries]
