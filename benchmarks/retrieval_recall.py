"""Recall@k of the search environment's retriever: the share of questions for which a gold answer
string appears in one of the top k passages (answers and passages compared after SQuAD's
normalization), over real Natural Questions questions and their gold Wikipedia passages, and
over the built-in world.

    python benchmarks/retrieval_recall.py --bigbench-nq TASK_JSON [--world DIR] [--work DIR]

Real data without a dataset hub: BIG-bench's `contextual_parametric_knowledge_conflicts` task
(in the `bigbench` 1.0.0 source distribution on PyPI) holds 17,528 NQ questions, each with its
gold passage in which the answer was replaced by another entity; its `target_scores` keep the
original answer, which is put back here. The passages (13,834 distinct) are the corpus:

    pip download --no-deps --no-binary :all: bigbench==1.0.0 -d /tmp/bb
    tar xzf /tmp/bb/bigbench-1.0.0.tar.gz -C /tmp/bb \\
        bigbench-1.0.0/bigbench/benchmark_tasks/contextual_parametric_knowledge_conflicts/task.json

The questions and corpus are written as an NQ-layout task file and a {id, title, text} corpus
into --work, and indexed with the project's own code (`envs.bm25_index`), so the figures are
those of a `search` task set on these files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from proc_memory import REPO

KS = (1, 3, 5)


def bigbench_nq(task_json: Path, work: Path) -> tuple[Path, Path]:
    """(NQ-layout tasks, corpus) restored from the BIG-bench task."""
    examples = json.loads(task_json.read_text())["examples"]
    tasks, passages = [], {}
    for i, ex in enumerate(examples):
        m = re.match(r"\s*Question:\s*(.*?)\s*Context:\s*(.*)", ex["input"], re.DOTALL)
        original = [a for a, score in ex["target_scores"].items() if score == 0]
        if m is None or len(original) != 1:
            continue
        passage = m[2].replace(ex["target"], original[0])
        pid = hashlib.sha1(passage.encode()).hexdigest()[:12]
        passages.setdefault(pid, passage)
        tasks.append({"id": f"nq-{i}", "question": m[1], "answer": [original[0]]})
    work.mkdir(parents=True, exist_ok=True)
    task_file, corpus = work / "nq_bigbench.jsonl", work / "nq_bigbench_passages.jsonl"
    task_file.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    corpus.write_text("".join(json.dumps({"id": pid, "title": "", "text": text}) + "\n"
                              for pid, text in passages.items()))
    return task_file, corpus


def recall(task_file: Path, corpus: Path, index_dir: Path, task_type: str) -> dict:
    from megatron_foresight.data.task_files import read_tasks
    from megatron_foresight.envs.bm25_index import build_index
    from megatron_foresight.answers import normalize_answer
    from megatron_foresight.envs.retriever import BM25Retriever

    manifest = build_index(corpus, index_dir, progress=False)
    retriever = BM25Retriever.open(index_dir)
    tasks = list(read_tasks(task_file, task_type))
    hits = {k: 0 for k in KS}
    for task in tasks:
        golds = [f" {normalize_answer(a)} " for a in task.answers if normalize_answer(a)]
        found = [f" {normalize_answer(d.title + ' ' + d.text)} "
                 for d, _ in retriever.search(task.question, max(KS))]
        for k in KS:
            hits[k] += any(g in p for g in golds for p in found[:k])
    return {"questions": len(tasks), "passages": manifest["passages"],
            **{f"recall@{k}": hits[k] / len(tasks) for k in KS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bigbench-nq", type=Path, help="the BIG-bench task.json (see above)")
    parser.add_argument("--world", type=Path, help="a built world: its validation questions")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recall-bench"))
    args = parser.parse_args()
    rows = {}
    if args.bigbench_nq:
        tasks, corpus = bigbench_nq(args.bigbench_nq, args.work)
        rows["NQ (BIG-bench gold passages)"] = recall(tasks, corpus, args.work / "nq-index",
                                                      "search")
    if args.world:
        rows["built-in world (validation)"] = recall(
            args.world / "tasks" / "search-validation.jsonl", args.world / "corpus.jsonl",
            args.work / "world-index", "search")
    if not rows:
        parser.error("give --bigbench-nq and/or --world")
    print(f"{'':32s} {'questions':>9s} {'passages':>9s} " + " ".join(f"{'R@' + str(k):>6s}"
                                                                    for k in KS))
    for name, r in rows.items():
        print(f"{name:32s} {r['questions']:9d} {r['passages']:9d} " +
              " ".join(f"{r[f'recall@{k}']:6.3f}" for k in KS))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
