"""Math tasks from reasoning-gym's procedural generators (Apache-2.0, nothing downloaded): real
tasks no one here wrote, in the task JSONL the math environment reads. The same name, count and
seed always give the same file."""

from __future__ import annotations

import difflib
from pathlib import Path

from tqdm import tqdm

from megatron_foresight.tasks import Task
from megatron_foresight.data.task_files import write_tasks
from megatron_foresight.errors import UsageError

MATH_DATASETS = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "decimal_chain_sum",
                 "decimal_arithmetic", "products", "leg_counting", "simple_equations", "gcd",
                 "lcm")
"""Arithmetic and word-problem generators whose answers are single numbers the math verifier
judges exactly (checked for reasoning-gym 0.1.25). Others import too, but their answers may ask
for what the verifier does not judge: fraction_simplification wants lowest terms (any equal
fraction would pass), power_function wants 3 significant figures, time_intervals wants HH:MM:SS."""

_LIST_ALL = ("python -c \"from reasoning_gym.factory import DATASETS; "
             "print('\\n'.join(sorted(DATASETS)))\"")


def import_reasoning_gym(name: str, n: int, seed: int, out: str | Path,
                         progress: bool = True) -> int:
    """Writes `n` tasks of reasoning-gym's generator `name` (seeded with `seed`) to the task
    JSONL `out`, atomically; returns the number written."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"reasoning-gym has no generator {name!r}; {hint}math ones: "
                         f"{', '.join(MATH_DATASETS)}; all {len(DATASETS)}: {_LIST_ALL}")
    if n < 1:
        raise UsageError(f"the number of tasks must be at least 1, got {n}")
    dataset = reasoning_gym.create_dataset(name, size=n, seed=seed)
    meta = {"source": "reasoning-gym", "dataset": name, "seed": seed}

    def tasks():
        # disable=None: a bar on a terminal only, not in logs.
        for i in tqdm(range(n), desc=f"reasoning-gym {name}", unit="task",
                      disable=None if progress else True):
            entry = dataset[i]
            yield Task(f"rg-{name}-{seed}-{i}", "math", entry["question"],
                       (str(entry["answer"]),), dict(meta))

    write_tasks(tasks(), out)
    return n
