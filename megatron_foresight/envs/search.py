"""The search environment (Search-R1 style): the agent queries a retriever over a corpus with
<search>, reads the top passages in <information>, and ends with <answer>, scored by normalized
exact match (the reward) and token F1."""

from __future__ import annotations

from megatron_foresight.data.tasks import Task
from megatron_foresight.envs.base import Episode
from megatron_foresight.envs.qa_metrics import exact_match, token_f1
from megatron_foresight.envs.retriever import BM25Retriever
from megatron_foresight.foresight.tags import INFORMATION, SEARCH

PROMPT = ("Answer the question. You can search a knowledge base: write <search> query </search> "
          "and the best passages come back between <information> and </information>. "
          "Search as often as you need, then give the final answer as <answer> ... </answer>.\n"
          "Question: {question}")


def format_passages(passages) -> str:
    if not passages:
        return "No passage matches the query."
    return "\n".join(f"Doc {i} (Title: {doc.title}) {doc.text}"
                     for i, (doc, _) in enumerate(passages, 1))


class SearchEnv(Episode):
    task_type = "search"
    tools = (SEARCH,)
    observation_tag = INFORMATION

    def __init__(self, retriever: BM25Retriever, top_k: int = 3, max_turns: int = 6):
        super().__init__(max_turns)
        self.retriever, self.top_k = retriever, top_k

    def prompt(self, task: Task) -> str:
        return PROMPT.format(question=task.question)

    def tool(self, query: str) -> str:
        return format_passages(self.retriever.search(query, self.top_k))

    def score(self, answer: str) -> tuple[float, bool, dict]:
        em = exact_match(answer, list(self.task.answers))
        return em, em == 1.0, {"f1": token_f1(answer, list(self.task.answers))}
