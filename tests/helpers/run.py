"""Run the real `foresight` command line as a user would: one process, or several under torchrun
(gloo on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_RECIPE = REPO / "tests" / "recipes" / "tiny-test.yaml"
TINY_STAGES = ["data.seq_length=512", "schedule.train_steps=2", "schedule.warmup_steps=0",
               "schedule.eval_interval=0", "schedule.global_batch_size=4",
               "schedule.micro_batch_size=2", "logging.tensorboard=false",
               "fc_rl.prompts_per_step=2", "fc_rl.group_size=2", "fc_rl.max_new_tokens=24"]
"""Every stage of recipes/tiny-cpu at a budget too small to learn anything: for plumbing
tests of `pipeline` and `experiment`."""


def python(target: list[str], nproc: int = 1, cwd: Path | None = None, check: bool = True,
           timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python TARGET...` (a script, or `-m module`), under torchrun when nproc > 1."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, *target]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if nproc > 1 else
                os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def foresight(args: list[str], nproc: int = 1, **kw) -> subprocess.CompletedProcess:
    return python(["-m", "megatron_foresight", *args], nproc, **kw)


def train(run_dir: Path, overrides: list[str] = (), nproc: int = 1, extra: list[str] = (),
          recipe: Path = TEST_RECIPE, cache_dir: Path | None = None, **kw):
    cache = [f"data.cache_dir={cache_dir}"] if cache_dir else []
    return foresight(["train", str(recipe), *cache, *overrides, "--run-dir", str(run_dir),
                      *extra], nproc=nproc, **kw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [m["lm_loss"] for m in metrics(run_dir)]


def megatron_forward(ckpt: str | Path, tokens, out: Path, nproc: int = 1, overrides=(),
                     greedy: int = 0):
    """Logits of `tokens` (or, with greedy=K, tokens plus K greedy continuations) from a
    checkpoint on the Megatron side, on `nproc` processes; see helpers/megatron_forward.py."""
    import numpy as np

    tokens_file = out.with_suffix(".tokens.npy")
    np.save(tokens_file, np.asarray(tokens, dtype=np.int64))
    python([str(REPO / "tests/helpers/megatron_forward.py"), str(ckpt), str(tokens_file), str(out),
            *(["--greedy", str(greedy)] if greedy else []), *overrides], nproc)
    return np.load(out)


def world_task_sets(world: Path, cache_dir: Path):
    """The built world's search and math task sets as the tiny recipes name them, prepared
    (the world's corpus indexed into `cache_dir`)."""
    from megatron_foresight.config import load_recipe
    from megatron_foresight.tasksets import TaskSets

    sets = TaskSets.of(load_recipe(REPO / "recipes" / "tiny-cpu" / "lm.yaml",
                                   [f"data.world={world}"]))
    sets.prepare(cache_dir, progress=False)
    return sets
