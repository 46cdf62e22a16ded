"""Whole-process-tree timing and peak memory of a command, for the benchmarks."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def peak_memory(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, peak of the process tree's summed PSS, peak RSS of its largest process). PSS
    splits shared pages among their sharers, so forked helper processes (dist_checkpointing's
    writers) are not counted twice as an RSS sum would."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak_total = peak_one = 0
    done = threading.Event()

    def sample():
        nonlocal peak_total, peak_one
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                info = [p.memory_full_info() for p in procs]
            except psutil.Error:
                continue
            peak_total = max(peak_total, sum(i.pss for i in info))
            peak_one = max(peak_one, max(i.rss for i in info))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return time.perf_counter() - start, peak_total / MB, peak_one / MB
