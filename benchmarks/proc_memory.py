"""Whole-process-tree timing and peak memory of a command, for the benchmarks."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

import psutil

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


class Measurement(NamedTuple):
    seconds: float
    pss_mb: float
    """Peak of the process tree's summed PSS."""
    largest_rss_mb: float
    """Peak RSS of its largest process."""
    anon_mb: float
    """Peak of the tree's summed anonymous resident memory (RssAnon): what the processes
    allocated, without the page cache of files they read or memory-map."""


def _anon_mb(pid: int) -> float:
    """A process's RssAnon (0 for one that has exited and has none)."""
    with open(f"/proc/{pid}/status") as f:
        return next((int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:")),
                    0.0)


def peak_memory(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, peak of the process tree's summed PSS, peak RSS of its largest process). PSS
    splits shared pages among their sharers, so forked helper processes (dist_checkpointing's
    writers) are not counted twice as an RSS sum would."""
    return measure(cmd)[:3]


def measure(cmd: list[str]) -> Measurement:
    """`peak_memory`, with the peak anonymous memory too."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak_total = peak_one = peak_anon = 0
    done = threading.Event()

    def sample():
        nonlocal peak_total, peak_one, peak_anon
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                info = [p.memory_full_info() for p in procs]
                anon = sum(_anon_mb(p.pid) for p in procs)
            except (psutil.Error, OSError):
                continue
            peak_total = max(peak_total, sum(i.pss for i in info))
            peak_one = max(peak_one, max(i.rss for i in info))
            peak_anon = max(peak_anon, anon)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return Measurement(time.perf_counter() - start, peak_total / MB, peak_one / MB, peak_anon)
