"""BM25 retrieval over a document corpus (bm25s: sparse matrices, Snowball stemming)."""

from __future__ import annotations

from typing import Sequence

from megatron_foresight.data.tasks import Document


class BM25Retriever:
    def __init__(self, documents: Sequence[Document]):
        import bm25s
        import Stemmer

        if not documents:
            raise ValueError("the corpus has no documents")
        self.documents = list(documents)
        self._stemmer = Stemmer.Stemmer("english")
        self._index = bm25s.BM25()
        self._index.index(self._tokenize([f"{d.title}\n{d.text}" for d in self.documents]),
                          show_progress=False)

    def _tokenize(self, texts: list[str]):
        import bm25s

        return bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, show_progress=False)

    def search(self, query: str, k: int) -> list[tuple[Document, float]]:
        """The `k` best documents for `query` with their scores, best first; documents that
        share no term with the query are left out, so the list may be shorter."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int) -> list[list[tuple[Document, float]]]:
        k = min(k, len(self.documents))
        ids, scores = self._index.retrieve(self._tokenize(queries), k=k, show_progress=False,
                                           n_threads=1)
        return [[(self.documents[i], float(s)) for i, s in zip(row_ids, row_scores) if s > 0]
                for row_ids, row_scores in zip(ids, scores)]
