"""Retrieval at corpus scale: `foresight data index` + the search environment's retriever against
bm25s used as its README shows (tokenize the whole corpus in memory, index, save, load
memory-mapped, retrieve), on the same synthetic corpus and queries, in the same run.

    python benchmarks/retrieval.py [--passages 1000000] [--queries 2000] [--work DIR]

The corpus is generated once into --work: passages of 60-120 words drawn from a Zipf-distributed
vocabulary of 200,000 made-up words (Wikipedia's 100-word passages are about 600 characters; so
are these), as {id, title, text} JSONL. Queries are 3-6 words of random passages. Each step runs
as its own process, timed with its process tree's peak memory (PSS). Printed: index build time
and peak memory (PSS, which counts the page cache of memory-mapped files, and anonymous memory
alone), index size on disk, resident memory after loading and after the queries, and
top-3 queries/s with 1 process and with 2 processes searching the same index at once (summed);
then ours over bm25s for each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from proc_memory import MB, REPO, measure

VOCAB = 200_000


def generate(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(VOCAB)]
    ranks = np.arange(1, VOCAB + 1)
    p = 1.0 / ranks ** 1.07
    p /= p.sum()
    with path.open("w") as f:
        for start in range(0, n, 10_000):
            lengths = rng.integers(60, 121, size=min(10_000, n - start))
            ids = rng.choice(VOCAB, size=int(lengths.sum()), p=p)
            pos = 0
            for i, length in enumerate(lengths):
                text = " ".join(words[j] for j in ids[pos:pos + length])
                pos += length
                title = " ".join(words[j] for j in ids[pos - 2:pos]).title()
                f.write(json.dumps({"id": str(start + i), "title": title, "text": text}) + "\n")


def make_queries(corpus: Path, n: int, out: Path, seed: int = 1) -> None:
    import random

    rng = random.Random(seed)
    lines = corpus.read_text().splitlines()
    queries = []
    for _ in range(n):
        words = json.loads(rng.choice(lines))["text"].split()
        k = rng.randint(3, 6)
        start = rng.randrange(len(words) - k)
        queries.append(" ".join(words[start:start + k]))
    out.write_text(json.dumps(queries))


def bm25s_build(corpus: Path, out: Path) -> None:
    """bm25s's documented path: the corpus in memory, tokenized, indexed, saved with it."""
    import bm25s
    import Stemmer

    docs = [json.loads(line) for line in corpus.open()]
    tokens = bm25s.tokenize([f"{d['title']}\n{d['text']}" for d in docs], stopwords="en",
                            stemmer=Stemmer.Stemmer("english"), show_progress=False)
    index = bm25s.BM25()
    index.index(tokens, show_progress=False)
    index.save(out, corpus=docs, show_progress=False)


def query(impl: str, index: Path, queries_file: Path, start: int, count: int) -> dict:
    """Load the index memory-mapped, then answer the queries at top-3; resident memory after
    each."""
    import psutil

    queries = json.loads(queries_file.read_text())[start:start + count]
    me = psutil.Process()
    t0 = time.perf_counter()
    if impl == "ours":
        from megatron_foresight.envs.retriever import BM25Retriever

        retriever = BM25Retriever.open(index)
        search = lambda q: retriever.search(q, 3)  # noqa: E731
    else:
        import bm25s
        import Stemmer

        retriever = bm25s.BM25.load(index, mmap=True, load_corpus=True)
        stemmer = Stemmer.Stemmer("english")
        search = lambda q: retriever.retrieve(  # noqa: E731
            bm25s.tokenize([q], stopwords="en", stemmer=stemmer, show_progress=False), k=3,
            show_progress=False, n_threads=1)
    loaded = time.perf_counter()
    rss_loaded = me.memory_info().rss
    for q in queries:
        search(q)
    seconds = time.perf_counter() - loaded
    return {"load_s": loaded - t0, "rss_loaded_mb": rss_loaded / MB,
            "rss_after_mb": me.memory_info().rss / MB, "qps": len(queries) / seconds}


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MB


def _concurrent(cmds: list[list[str]]) -> list[dict]:
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a query process failed")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--work", default="/tmp/retrieval-bench")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "bm25s-build":
        return bm25s_build(Path(args.args[0]), Path(args.args[1]))
    if args.step == "query":
        impl, index, queries, start, count = args.args
        print(json.dumps(query(impl, Path(index), Path(queries), int(start), int(count))))
        return None

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.passages}.jsonl"
    if not corpus.exists():
        print(f"generating {args.passages} passages ...", flush=True)
        generate(corpus, args.passages)
    queries = work / f"queries-{args.passages}-{args.queries}.json"
    if not queries.exists():
        make_queries(corpus, args.queries, queries)
    print(f"corpus: {corpus} ({corpus.stat().st_size / MB:.0f} MB, {args.passages} passages)",
          flush=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    dirs = {"ours": work / f"ours-{args.passages}", "bm25s": work / f"bm25s-{args.passages}"}
    builds = {
        "ours": [sys.executable, "-m", "megatron_foresight", "data", "index", str(corpus),
                 "--out", str(dirs["ours"]), "--force"],
        "bm25s": [*me, "--step", "bm25s-build", "--args", str(corpus), str(dirs["bm25s"])]}
    rows = {}
    for impl in ("ours", "bm25s"):
        m = measure(builds[impl])
        rows[impl] = {"build_s": m.seconds, "build_peak_mb": m.pss_mb,
                      "build_anon_mb": m.anon_mb, "disk_mb": _size_mb(dirs[impl])}
        print(f"{impl}: built in {m.seconds:.1f} s, peak {m.pss_mb:.0f} MB "
              f"({m.anon_mb:.0f} MB anonymous)", flush=True)
    half = args.queries // 2
    for impl in ("ours", "bm25s"):
        cmd = lambda s, c: [*me, "--step", "query", "--args", impl,  # noqa: E731
                            str(dirs[impl]), str(queries), str(s), str(c)]
        one = _concurrent([cmd(0, args.queries)])[0]
        two = _concurrent([cmd(0, half), cmd(half, half)])
        rows[impl].update(one, qps_2proc=sum(r["qps"] for r in two))
    print()
    fields = [("build_s", "index build (s)", ".1f"), ("build_peak_mb", "build peak PSS (MB)", ".0f"),
              ("build_anon_mb", "build peak anonymous (MB)", ".0f"),
              ("disk_mb", "index on disk (MB)", ".0f"), ("load_s", "load (s)", ".2f"),
              ("rss_loaded_mb", "RSS after load (MB)", ".0f"),
              ("rss_after_mb", f"RSS after {args.queries} queries (MB)", ".0f"),
              ("qps", "queries/s top-3, 1 process", ".0f"),
              ("qps_2proc", "queries/s top-3, 2 processes", ".0f")]
    print(f"{args.passages} passages   {'ours':>10s} {'bm25s':>10s} {'ours/bm25s':>11s}")
    for key, label, fmt in fields:
        a, b = rows["ours"][key], rows["bm25s"][key]
        print(f"{label:36s} {a:10{fmt}} {b:10{fmt}} {a / b:10.2f}x")
    print("(disk: ours holds the bm25s score matrix plus the passages and their offsets; bm25s "
          "the same matrix plus its corpus.jsonl and a JSON line index)")
    (work / f"result-{args.passages}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
