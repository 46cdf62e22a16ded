"""Math tasks from reasoning-gym's procedural generators (Apache-2.0, no download): real tasks
no one here wrote, in the task JSONL the math environment reads."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from megatron_foresight.data.tasks import Task, write_tasks
from megatron_foresight.errors import UsageError

MATH_DATASETS = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "products", "leg_counting")
"""Generators whose answers are numbers the math verifier checks exactly (others import, but
their answers may need a form the verifier does not judge, e.g. a fraction in lowest terms)."""


def import_reasoning_gym(name: str, n: int, seed: int, out: str | Path,
                         progress: bool = True) -> int:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise UsageError(f"reasoning-gym has no generator {name!r}; math ones: "
                         f"{', '.join(MATH_DATASETS)} (all {len(DATASETS)}: python -c "
                         "\"from reasoning_gym.factory import DATASETS; print(sorted(DATASETS))\")")
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    dataset = reasoning_gym.create_dataset(name, size=n, seed=seed)

    def tasks():
        for i in tqdm(range(n), desc=f"reasoning-gym {name}", disable=None if progress else True):
            entry = dataset[i]
            yield Task(f"rg-{name}-{seed}-{i}", "math", entry["question"], (str(entry["answer"]),),
                       {"source": "reasoning-gym", "dataset": name, "seed": seed})

    write_tasks(tasks(), out)
    return n
