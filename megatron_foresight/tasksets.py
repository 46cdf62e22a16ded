"""A recipe's task sets at run time (`tasks:`, `config.TaskSetConfig`): their tasks per split,
the environment that plays each task, the draw of FC-RL's training tasks by weight, and the
checks of their files that run before any process starts."""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from megatron_foresight.data.records import check_first_records
from megatron_foresight.tasks import Task
from megatron_foresight.data.task_files import parse_task, read_tasks
from megatron_foresight.envs import registry
from megatron_foresight.envs.base import Episode
from megatron_foresight.envs.registry import EnvContext
from megatron_foresight.errors import UsageError
from megatron_foresight.world.build import ensure_world

log = logging.getLogger(__name__)

class TaskSet:
    """One task set: its tasks, read once per split, and its environment."""

    def __init__(self, cfg):
        self.cfg, self.name, self.spec = cfg, cfg.name, registry.get(cfg.env)
        self._tasks: dict[str, list[Task]] = {}
        self._factory = None

    @property
    def splits(self) -> list[str]:
        return list(self.cfg.files)

    def file(self, split: str) -> Path:
        if split not in self.cfg.files:
            raise UsageError(f"task set {self.name!r} has no {split!r} split (it has "
                             f"{', '.join(self.cfg.files) or 'none'})")
        return Path(self.cfg.files[split])

    def tasks(self, split: str) -> list[Task]:
        if split not in self._tasks:
            skipped: list = []
            tasks = [replace(t, task_set=self.name) for t in read_tasks(
                self.file(split), self.cfg.env, skipped if self.cfg.skip_bad else None)]
            if skipped:
                log.warning("task set %s, %s: skipped %d record(s) that do not read, first: %s",
                            self.name, split, len(skipped), skipped[0])
            if not tasks:
                raise UsageError(f"task set {self.name!r}: {self.file(split)} holds no tasks")
            self._tasks[split] = tasks
        return self._tasks[split]

    def prepare(self, ctx: EnvContext) -> None:
        if self._factory is None:
            self._factory = self.spec.make(self.cfg.env_options, ctx)

    def make_env(self) -> Episode:
        if self._factory is None:
            raise RuntimeError(f"task set {self.name!r}: prepare() before make_env()")
        return self._factory()

    def check_files(self, splits: Sequence[str] | None = None) -> None:
        """Each split's file exists and its first records read as tasks; the environment's
        own files (a corpus) too. A world not built yet is skipped (it is built on first use);
        with `skip_bad` the records are not held against the set."""
        if self.cfg.world and not all(Path(f).exists() for f in self.cfg.files.values()):
            return
        for split in splits or self.splits:
            path = self.file(split)
            if not path.is_file():
                raise UsageError(f"task set {self.name!r}, split {split!r}: {path} not found")
            if not self.cfg.skip_bad:
                check_first_records(path, lambda r: parse_task(r, "check", self.cfg.env))
        if self.spec.check is not None:
            self.spec.check(self.cfg.env_options)


class TaskSets:
    """Every task set of a recipe (or a one-off file's), by name."""

    def __init__(self, configs: Sequence, world: str | None = None, seed: int = 0):
        if not configs:
            raise UsageError("the recipe has no task sets: add a `tasks:` list (see `foresight "
                             "config --keys`), or pass --tasks-file F --env NAME")
        self.sets = [TaskSet(c) for c in configs]
        self.by_name = {s.name: s for s in self.sets}
        self.world, self.seed = world, seed

    @classmethod
    def of(cls, cfg, names: Sequence[str] | None = None) -> "TaskSets":
        """The recipe's task sets, or those of them named in `names`."""
        configs = list(cfg.tasks)
        if names:
            unknown = sorted(set(names) - {c.name for c in configs})
            if unknown:
                raise UsageError(f"no task set named {', '.join(unknown)}; the recipe has "
                                 f"{', '.join(c.name for c in configs) or 'none'}")
            configs = [c for c in configs if c.name in names]
        return cls(configs, cfg.data.world, cfg.seed)

    def check_files(self, split: str | None = None) -> None:
        """Every set's files, or with `split` only that split's (of the sets that have it)."""
        for s in self.with_split(split) if split else self.sets:
            s.check_files([split] if split else None)

    def prepare(self, cache_dir: Path, progress: bool = True) -> None:
        """Build what the environments share (the world if a set plays it, corpus indices);
        every rank calls this at the same point."""
        if any(s.cfg.world for s in self.sets):
            ensure_world(self.world, self.seed)
        ctx = EnvContext(Path(cache_dir), progress)
        for s in self.sets:
            s.prepare(ctx)

    def make_env(self, task: Task) -> Episode:
        return self.by_name[task.task_set].make_env()

    def with_split(self, split: str) -> list[TaskSet]:
        found = [s for s in self.sets if split in s.splits]
        if not found:
            raise UsageError(f"no task set has a {split!r} split (" + "; ".join(
                f"{s.name}: {', '.join(s.splits)}" for s in self.sets) + ")")
        return found

    def tasks(self, split: str, n: int | None = None) -> list[Task]:
        """Up to `n` tasks of `split`, taking from the sets in turn (one of each, then the
        next of each ...), so every set is played; a set that runs out leaves the turn to the
        others."""
        streams = [iter(s.tasks(split)) for s in self.with_split(split)]
        out: list[Task] = []
        while streams and (n is None or len(out) < n):
            for stream in list(streams):
                task = next(stream, None)
                if task is None:
                    streams.remove(stream)
                elif n is None or len(out) < n:
                    out.append(task)
        return out

    def draw(self, split: str, count: int, rng: random.Random) -> list[Task]:
        """`count` tasks of `split`: each slot's set drawn by weight, then tasks of that set
        drawn without replacement (with replacement once a small set runs out)."""
        sets = self.with_split(split)
        choice = rng.choices(range(len(sets)), [s.cfg.weight for s in sets], k=count)
        out: list[Task | None] = [None] * count
        for j, s in enumerate(sets):
            slots = [i for i, c in enumerate(choice) if c == j]
            tasks = s.tasks(split)
            picks = rng.sample(range(len(tasks)), min(len(slots), len(tasks)))
            picks += [rng.randrange(len(tasks)) for _ in range(len(slots) - len(picks))]
            for slot, pick in zip(slots, picks):
                out[slot] = tasks[pick]
        return out
