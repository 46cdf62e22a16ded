"""The search environment (Search-R1 style): the agent queries a retriever over a corpus with
<search>, reads the top passages in <information>, and ends with <answer>, scored by normalized
exact match (the reward) and token F1. Registered as `search`; its task-set options are
`SearchOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from megatron_foresight.configtree import check
from megatron_foresight.data.records import check_first_records
from megatron_foresight.tasks import Task
from megatron_foresight.data.task_files import parse_document
from megatron_foresight.envs.base import Episode, PromptOptions, load_prompt_template
from megatron_foresight.envs.bm25_index import MANIFEST, corpus_files, ensure_index, matches
from megatron_foresight.answers import exact_match, token_f1
from megatron_foresight.envs.registry import EnvContext, EnvSpec, register
from megatron_foresight.envs.retriever import BM25Retriever
from megatron_foresight.errors import UsageError
from megatron_foresight.foresight.tags import INFORMATION, SEARCH

PROMPT = load_prompt_template(None, "search")
"""The default instruction (prompts/search.txt); a task set's `prompt_template` replaces it."""


def _clip(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    cut = text[:limit]
    return (cut[:cut.rfind(" ")] if " " in cut else cut) + " ..."


def format_passages(passages, max_chars: int | None = None) -> str:
    if not passages:
        return "No passage matches the query."
    return "\n".join(f"Doc {i} (Title: {doc.title}) {_clip(doc.text, max_chars)}"
                     for i, (doc, _) in enumerate(passages, 1))


class SearchEnv(Episode):
    task_type = "search"
    tools = (SEARCH,)
    observation_tag = INFORMATION

    def __init__(self, retriever: BM25Retriever, top_k: int = 3, max_turns: int = 6,
                 max_passage_chars: int | None = None, template: str = PROMPT):
        super().__init__(max_turns)
        self.retriever, self.top_k, self.max_passage_chars = retriever, top_k, max_passage_chars
        self.template = template

    def prompt(self, task: Task) -> str:
        return self.template.format(question=task.question)

    def tool(self, query: str) -> str:
        return format_passages(self.retriever.search(query, self.top_k), self.max_passage_chars)

    def score(self, answer: str) -> tuple[float, bool, dict]:
        em = exact_match(answer, list(self.task.answers))
        return em, em == 1.0, {"f1": token_f1(answer, list(self.task.answers))}


@dataclass
class SearchOptions(PromptOptions):
    """A retriever over a passage corpus."""

    corpus: Optional[Union[str, list[str]]] = None
    """The passages: a JSONL file ({id, title, text} or Search-R1's {id, contents}), .jsonl.gz,
    a directory of such shards, or a list of those. Indexed once into the data cache (BM25) and
    memory-mapped by every process; `foresight data index` builds the index ahead of time."""
    index: Optional[str] = None
    """A directory written by `foresight data index`; with `corpus` too, it must have been built
    from that corpus. Null: the cache's index of `corpus`, built on first use."""
    retriever: Literal["bm25"] = "bm25"
    """How passages are ranked: BM25 (bm25s's scoring, English stems and stop words)."""
    top_k: int = 3
    """Passages returned per search."""
    max_passage_chars: Optional[int] = None
    """Cut each returned passage's text to about this many characters (at a word); null: whole
    passages (Search-R1's 100-word Wikipedia passages are about 600)."""
    max_turns: int = 6
    """Agent turns before the episode ends without an answer."""
    skip_bad: bool = False
    """Index a corpus whose records partly do not read by leaving those out (counted in the
    index's manifest and logged), instead of stopping at the first with its file and line."""

    def __post_init__(self):
        check(self.corpus is not None or self.index is not None, "corpus",
              "a search task set needs a corpus (a JSONL file, .jsonl.gz or a directory of "
              "shards) or a prebuilt index (foresight data index)")
        check(self.corpus != [], "corpus", "lists no file")
        check(self.top_k >= 1, "top_k", "must be at least 1")
        check(self.max_turns >= 1, "max_turns", "must be at least 1")
        check(self.max_passage_chars is None or self.max_passage_chars >= 20,
              "max_passage_chars", "null or at least 20")

    @property
    def corpus_paths(self) -> list[str]:
        return [] if self.corpus is None else \
            [self.corpus] if isinstance(self.corpus, str) else list(self.corpus)


def check_files(options: SearchOptions) -> None:
    """The corpus exists and its first records read as passages; an index is an index; the
    prompt template reads."""
    load_prompt_template(options.prompt_template, "search")
    if options.index is not None and not (Path(options.index) / MANIFEST).is_file():
        raise UsageError(f"index {options.index}: not a corpus index (no {MANIFEST}); build it "
                         "with `foresight data index CORPUS --out DIR`")
    if options.corpus_paths and not options.skip_bad:
        check_first_records(corpus_files(options.corpus_paths)[0], parse_document)


def make_search(options: SearchOptions, ctx: EnvContext):
    if options.index is not None:
        index = Path(options.index)
        if options.corpus_paths and not matches(index, corpus_files(options.corpus_paths)):
            raise UsageError(f"index {index} was not built from {', '.join(options.corpus_paths)}"
                             f" (its manifest names other files or contents); build it again "
                             f"with `foresight data index` or drop one of the two options")
    else:
        index = ensure_index(options.corpus_paths, ctx.cache_dir, options.skip_bad,
                             ctx.progress)
    retriever = BM25Retriever.open(index)
    template = load_prompt_template(options.prompt_template, "search")
    return lambda: SearchEnv(retriever, options.top_k, options.max_turns,
                             options.max_passage_chars, template)


def search_metrics(records: Sequence) -> dict[str, float]:
    """Exact match (the reward) and token F1 of the final answers, Search-R1's two scores."""
    if not records:
        return {}
    return {"em": sum(r.reward for r in records) / len(records),
            "f1": sum(r.info.get("f1", 0.0) for r in records) / len(records)}


SPEC = register(EnvSpec(
    name="search", episode=SearchEnv, options=SearchOptions, make=make_search,
    check=check_files, metrics=search_metrics,
    description="question answering with a retriever over a passage corpus (EM, F1)"))
