"""`foresight data build-world`: the built-in world written to a directory. The same seed and
sizes give byte-identical files.

    DIR/world.json                  the knowledge base
    DIR/corpus.jsonl                one document per entity ({id, title, text})
    DIR/tasks/{search,math}-{train,validation,test}.jsonl   disjoint splits
    DIR/trajectories/{train,validation}.jsonl   scripted-agent trajectories with MC estimates
    DIR/tokenizer/spm.model         a sentencepiece model of the world's text (tags are tokens)
    DIR/manifest.json               seed, sizes, counts, success rates, file hashes
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from megatron_foresight.data.records import write_lines
from megatron_foresight.data.task_files import write_corpus, write_tasks
from megatron_foresight.data.trajectory import (
    SCHEMA, MCEstimate, Outcome, Trajectory, Turn, read_trajectories,
)
from megatron_foresight.envs import registry
from megatron_foresight.envs.retriever import BM25Retriever
from megatron_foresight.errors import UsageError
from megatron_foresight.runtime.dist import barrier, is_rank0
from megatron_foresight.world import kb as kb_mod
from megatron_foresight.world.agents import MathExpert, SearchExpert, mc_success, play
from megatron_foresight.world.sizes import WorldSizes
from megatron_foresight.world.tasks import math_problems, search_questions, split
from megatron_foresight.world.tasksets import WORLD_ENVS

log = logging.getLogger(__name__)


class World:
    """The knowledge base, corpus and tasks of one seed, and what plays in it."""

    def __init__(self, seed: int, sizes: WorldSizes):
        sizes.check()
        self.seed, self.sizes = seed, sizes
        self.kb = kb_mod.build_kb(random.Random(f"{seed}/kb"), sizes.cities, sizes.people,
                                  sizes.guilds)
        self.documents = kb_mod.corpus(self.kb, random.Random(f"{seed}/corpus"))
        search = search_questions(self.kb, random.Random(f"{seed}/search"), sizes.search_tasks,
                                  sizes.multi_hop_fraction)
        maths = math_problems(self.kb, random.Random(f"{seed}/math"), sizes.math_tasks,
                              sizes.math_max_steps)
        self.splits = {"search": split(search, random.Random(f"{seed}/split/search")),
                       "math": split(maths, random.Random(f"{seed}/split/math"))}
        self._retriever = None
        self._values = None

    @property
    def retriever(self) -> BM25Retriever:
        if self._retriever is None:
            self._retriever = BM25Retriever.from_documents(self.documents)
        return self._retriever

    def env(self, task_type: str):
        """The registered environment of a world task, as the world's sizes configure it
        (`world.tasksets` gives task sets the same options); search reads the world's corpus
        from memory."""
        episode = registry.get(task_type).episode
        if task_type == "search":
            return episode(self.retriever, self.sizes.top_k, self.sizes.search_max_turns)
        return episode(self.sizes.math_max_turns)

    def expert(self, task_type: str, noise: float):
        if task_type == "math":
            return MathExpert(noise)
        if self._values is None:
            values: dict[str, set] = {}
            for e in self.kb.entities:
                for k, v in e.attrs.items():
                    values.setdefault(k, set()).add(str(v))
            self._values = {k: sorted(v) for k, v in values.items()}
        return SearchExpert(noise, [e.name for e in self.kb.entities], self._values)

    def trajectory(self, split_name: str, index: int) -> Trajectory:
        """Trajectory `index` of a split: its task, noise level and randomness follow from the
        seed and the index alone, so trajectories can be made in any order, in any process."""
        task_type = WORLD_ENVS[index % 2]
        tasks = self.splits[task_type][split_name]
        step = index // 2
        task = tasks[step % len(tasks)]
        # Shifted on each pass over the tasks, so a task meets different noise levels.
        noise = self.sizes.noise[(step + step // len(tasks)) % len(self.sizes.noise)]
        key = f"{self.seed}/trajectory/{split_name}/{index}"
        env, agent = self.env(task_type), self.expert(task_type, noise)
        played = play(env, agent, task, random.Random(key), keep_snapshots=True)
        mc = []
        if self.sizes.mc_samples:
            for t, snapshot in enumerate(played.snapshots):
                wins = mc_success(snapshot, agent, task, played.history[:t],
                                  self.sizes.mc_samples, f"{key}/mc/{t}")
                mc.append(MCEstimate(t, self.sizes.mc_samples, wins))
        turns = []
        for agent_text, observation in played.history:
            turns.append(Turn("agent", agent_text))
            if observation is not None:
                turns.append(Turn("env", observation))
        return Trajectory(
            id=f"{split_name}-{index}", task_id=task.id, task_type=task_type,
            prompt=played.prompt, turns=tuple(turns),
            outcome=Outcome(played.success, played.reward, played.answer), mc=tuple(mc),
            meta={"agent": "expert", "noise": noise, "split": split_name})


_WORKER_WORLD: World | None = None


def _init_worker(seed: int, sizes: WorldSizes) -> None:
    global _WORKER_WORLD
    _WORKER_WORLD = World(seed, sizes)


def _worker_trajectory(split_name: str, index: int) -> Trajectory:
    return _WORKER_WORLD.trajectory(split_name, index)


def _trajectories(world: World, split_name: str, count: int, workers: int,
                  progress: bool) -> Iterator[Trajectory]:
    bar = partial(tqdm, total=count, desc=f"trajectories ({split_name})", unit=" traj",
                  disable=None if progress else True, mininterval=1)
    if workers <= 1:
        yield from bar(world.trajectory(split_name, i) for i in range(count))
        return
    with get_context("spawn").Pool(workers, _init_worker, (world.seed, world.sizes)) as pool:
        # imap keeps the order, so the file does not depend on the number of workers.
        yield from bar(pool.imap(partial(_worker_trajectory, split_name), range(count),
                                 chunksize=16))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Tally:
    """Success rates by task type and noise level, counted as trajectories are written."""

    def __init__(self):
        self.stats: dict[str, tuple[int, int]] = {}

    def lines(self, trajectories: Iterator[Trajectory]) -> Iterator[str]:
        for t in trajectories:
            key = f"{t.task_type}/noise={t.meta['noise']}"
            wins, n = self.stats.get(key, (0, 0))
            self.stats[key] = (wins + t.outcome.success, n + 1)
            yield t.to_json()

    def summary(self) -> dict:
        return {k: {"trajectories": n, "success_rate": round(w / n, 4)}
                for k, (w, n) in sorted(self.stats.items())}


def build_world(out: str | Path, seed: int = 1234, sizes: WorldSizes = WorldSizes(),
                workers: int = 1, progress: bool = True) -> dict:
    out = Path(out)
    world = World(seed, sizes)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    (out / "trajectories").mkdir(exist_ok=True)
    with (out / "world.json.tmp").open("w", encoding="utf-8") as f:
        json.dump(world.kb.to_dict(), f, ensure_ascii=False, indent=1)
    os.replace(out / "world.json.tmp", out / "world.json")
    write_corpus(world.documents, out / "corpus.jsonl")
    for task_type, splits in world.splits.items():
        for split_name, tasks in splits.items():
            write_tasks(tasks, out / "tasks" / f"{task_type}-{split_name}.jsonl")
    counts = {"train": sizes.trajectories, "validation": sizes.validation_trajectories}
    summaries = {}
    for split_name, count in counts.items():
        path = out / "trajectories" / f"{split_name}.jsonl"
        tally = _Tally()
        write_lines(tally.lines(_trajectories(world, split_name, count, workers, progress)),
                    path)
        summaries[split_name] = tally.summary()
    if sizes.vocab_size:
        from megatron_foresight.data.tokenizer import train_sentencepiece

        train_sentencepiece(_tokenizer_text(world, out), out / "tokenizer" / "spm.model",
                            sizes.vocab_size)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "seed": seed, "sizes": asdict(sizes), "trajectory_schema": SCHEMA,
        "tasks": {t: {s: len(v) for s, v in splits.items()} for t, splits in world.splits.items()},
        "documents": len(world.documents), "success": summaries,
        "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                  for p in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _tokenizer_text(world: World, out: Path) -> Iterator[str]:
    """What the world's tokenizer learns from: the corpus, the training questions and the
    training trajectories (streamed back from the file just written), as the model reads them."""
    for doc in world.documents:
        yield f"{doc.title}\n{doc.text}"
    for task_type in sorted(world.splits):
        for task in world.splits[task_type]["train"]:
            yield task.question
    for t in read_trajectories(out / "trajectories" / "train.jsonl"):
        yield "\n".join([t.prompt, *(turn.text for turn in t.turns)])


def ensure_world(out: str | Path, seed: int) -> Path:
    """The world in `out`, built there (default sizes, `seed`) if it is not: rank 0 builds into
    a temporary directory and renames it, so a crash never leaves half a world; the other ranks
    wait. A directory without `manifest.json` is refused rather than overwritten."""
    out = Path(out)
    if is_rank0() and not (out / "manifest.json").is_file():
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"data.world={out} exists but holds no world (no manifest.json); "
                             "point data.world elsewhere or build one there with `foresight "
                             "data build-world --out DIR`")
        log.info("building the built-in world in %s (seed %d)", out, seed)
        tmp = out.with_name(out.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        build_world(tmp, seed, workers=min(2, os.cpu_count() or 1))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    barrier()
    return out
