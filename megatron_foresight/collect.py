"""`foresight data collect`: play a policy (any checkpoint the project reads) on a recipe's task
sets and write its episodes as trajectories (`foresight.trajectory/1`) with a Monte-Carlo
success estimate of every state before an agent turn: the data WM-AMT and FE-SFT train on.

Per task: `samples` episodes at `temperature`; then, with `mc` > 0, `mc` continuations from
each state, sampled from the same policy at the same temperature, played together through the
generator. The state before agent turn k of an episode is its context up to that turn (the
record's token ids, not re-encoded text) and its environment, reproduced by replaying the
episode's first k agent turns on a fresh environment (each replayed observation must equal the
played one: estimates from a non-deterministic environment would be meaningless, so it is an
error) and copied once per continuation (`copy.copy`, as the built-in world's experts do).

Estimates: the state before turn 0 is the same for every sample of a task, so its `mc` fresh
episodes are played once and shared, and each sample's turn-0 estimate adds the task's other
samples (leave-one-out: its own outcome is left out, so the estimate stays unbiased given that
outcome): n = mc + samples - 1. Every later state gets its own `mc` continuations: n = mc.
With mc = 0 no estimates are written (FE-SFT then takes the outcome as the value target).

Determinism: a task is the unit of work. Its draws are seeded from the recipe's seed, the
task set and the task id, so a task's records do not depend on which other tasks a process
plays: a resumed run, or one over another number of data-parallel ranks, writes the same
records. With `--rollout rounds` one task is played at a time, its samples in batches that
share one stream (--batch-size decides the draws): exactly the same records. With `--rollout
continuous` (the default) the samples of several tasks share the KV-cache slots, refilled as
episodes end (then their continuations likewise), every episode drawing from its own streams
(`agent.row_seed` of the task's seed, the sample and the turn): the same draws whichever tasks
share the batch, over logits equal up to the float rounding of another batch shape (a draw
near a boundary may then differ). A resumed run on the same layout plays the group of tasks a
kill interrupted again, whole (`task_groups`), so its records are exactly the first run's;
over another number of data-parallel ranks, up to that rounding. A resume keeps both flags
(`IDENTITY`).

Output, in DIR: `collect-RRRRR-of-DDDDD.jsonl` per data-parallel rank (task i is played by
rank i % D), one canonical line per trajectory, flushed as written and fsynced every
`FSYNC_SECONDS`; `collect-...dropped.txt`, the ids --drop-failed left out; `collect.json`, the
recipe, checkpoint and options (written first, so a resume with other options is refused),
then the counts and throughput. A re-run skips the tasks whose every sample is written (or
dropped); a last line torn by a kill is cut off with a warning.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_foresight.data.trajectory import MCEstimate, Outcome, Trajectory, Turn
from megatron_foresight.errors import UsageError
from megatron_foresight.eval.run import EvalOptions
from megatron_foresight.inference.agent import (
    EpisodeRecord, play_episodes, start_episodes,
)
from megatron_foresight.inference.generate import Sampling

log = logging.getLogger(__name__)

MANIFEST = "collect.json"
FSYNC_SECONDS = 30.0
"""How often the shards reach the disk: an fsync stalls the writer (milliseconds on a local
disk, more on NFS), a kill loses at most this much work, which a resume plays again."""

IDENTITY = {"checkpoint": "--ckpt", "split": "--split", "samples": "--samples", "mc": "--mc",
            "temperature": "--temperature", "max_new_tokens": "--max-new-tokens",
            "drop_failed": "--drop-failed", "seed": "the recipe's seed",
            "format": "the recipe's foresight_format", "foresight": "--foresight",
            "top_p": "--top-p", "batch_size": "--batch-size", "tokenizer": "data.tokenizer",
            "seq_length": "data.seq_length", "env_options": "the task sets' options",
            "rollout": "--rollout"}
"""What a collection's records depend on (beyond the task), with the flag that sets it: a
resume must keep them all. --batch-size decides how rows share a batch's random stream (by
rounds) or which tasks share the slots (continuously: the same draws, logits equal up to the
float rounding of other batch shapes);
data.tokenizer and data.seq_length what the model reads (and where a context is cut); each
played set's environment options (prompt template, top-k, corpus, turn budget) what it is
asked and answered; --rollout how episodes draw (see the module docstring)."""
NOT_RECORDED = "(not recorded)"
WHEN_ABSENT = {"rollout": "rounds"}
"""What a key missing from an older collect.json stood for: collections made before --rollout
existed were played by rounds."""
ROLLOUTS = ("continuous", "rounds")


@dataclass
class CollectOptions(EvalOptions):
    """`foresight data collect`'s options: eval's task selection and generation flags, plus
    how many episodes per task and continuations per state, and where they go."""

    out: str = ""
    tasks: int | None = None
    """Tasks to play, taken from the task sets in turn; None: every task of the split."""
    split: str = "train"
    temperature: float = 1.0
    samples: int = 4
    """Episodes per task."""
    mc: int = 4
    """Continuations per state for its Monte-Carlo success estimate; 0 for none."""
    drop_failed: bool = False
    """Leave out unsuccessful episodes (WM-AMT learns from failures too: kept by default)."""
    foresight: bool = False
    """Ask the policy for foresight (the recipe's format) and keep what it writes. Off: the
    environment's bare prompt, turns end at any action's closing tag, and FE-SFT's hindsight
    adds the instruction and foresight blocks built from the real observations and these
    Monte-Carlo estimates (a policy's own guessed values would be kept instead)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens with this much probability."""

    def __post_init__(self):
        if self.samples < 1:
            raise UsageError(f"--samples {self.samples}: give at least 1 episode per task")
        if self.mc < 0:
            raise UsageError(f"--mc {self.mc}: give 0 (no estimates) or more continuations")
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature:g}: must be 0 (greedy) or more")
        if self.temperature == 0 and (self.samples > 1 or self.mc > 0):
            raise UsageError("--temperature 0 is greedy: every sample of a task and every "
                             "continuation of a state would be the same episode; sample "
                             "(--temperature 1), or pass --samples 1 --mc 0")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p:g}: must be in (0, 1]")
        if self.rollout not in ROLLOUTS:
            raise UsageError(f"--rollout {self.rollout}: one of {', '.join(ROLLOUTS)}")
        if self.tasks is not None and self.tasks < 1:
            raise UsageError(f"--tasks {self.tasks}: give at least 1 (default: all tasks)")
        for flag, value in (("--max-new-tokens", self.max_new_tokens),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise UsageError(f"{flag} {value}: must be at least 1")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UsageError(f"--out {self.out} is a file; give a directory")

    def identity(self, cfg, checkpoint: Path, task_sets, tokenizer=None) -> dict:
        """The values of IDENTITY's keys for this command, as collect.json reads back (JSON
        has no tuples). Without `tokenizer` (before the processes start: the world's tokenizer
        may not be built yet) its key is left out, and checked once it is built."""
        values = {"checkpoint": str(checkpoint.resolve()), "split": self.split,
                  "samples": self.samples, "mc": self.mc, "temperature": self.temperature,
                  "max_new_tokens": self.max_new_tokens, "drop_failed": self.drop_failed,
                  "seed": cfg.seed, "format": cfg.foresight_format, "foresight": self.foresight,
                  "top_p": self.top_p, "batch_size": self.batch_size, "rollout": self.rollout,
                  "seq_length": cfg.data.seq_length,
                  "env_options": {s.name: dataclasses.asdict(s.cfg.env_options)
                                  for s in task_sets.with_split(self.split)}}
        if tokenizer is not None:
            values["tokenizer"] = tokenizer.describe()
        return json.loads(json.dumps(values, default=str))


def read_manifest(out: Path) -> dict | None:
    """OUT's collect.json, or None when there is none; one that does not read (empty after a
    crash on a file system that lost it, or edited) is a one-line error, not a traceback."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        if not isinstance(body.get("options"), dict):
            raise ValueError
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise UsageError(f"{path} does not read as a collection manifest (JSON with "
                         "\"options\"); delete it to keep the shards and resume (their options "
                         "are then not checked), or use another --out") from None
    return body


def check_resumable(out: Path, identity: dict) -> None:
    """Refuse to add records to a collection made with other options (mixed records would
    pass as one policy's). Keys missing from `identity` are not checked (see `identity`)."""
    manifest = read_manifest(out)
    if manifest is None:
        return
    recorded, was, now = manifest["options"], [], []
    for key, flag in IDENTITY.items():
        if key not in identity:
            continue
        old, new = recorded.get(key, WHEN_ABSENT.get(key, NOT_RECORDED)), identity[key]
        if key == "env_options" and isinstance(old, dict):
            # a resume may play fewer or other sets (`_selection`): only the sets both play
            # must have the same options
            old = {name: o for name, o in old.items() if name in new and o != new[name]}
            new = {name: new[name] for name in old}
        if old != new:
            was.append(f"{flag} {old}")
            now.append(f"{flag} {new}")
    if was:
        raise UsageError(f"--out {out} holds a collection made with {', '.join(was)} (this "
                         f"command: {', '.join(now)}); use another --out, or the same options "
                         "to resume it")


# --------------------------------------------------------------------------------------------
# one task: its samples and their Monte-Carlo estimates


@dataclass
class TaskPlay:
    records: list[EpisodeRecord]
    estimates: list[list[MCEstimate]]
    """Per sample, the estimate of each state before an agent turn (empty with mc = 0)."""
    continuations: int = 0
    tokens: int = 0
    """Tokens generated, continuations included."""


def derived_seed(seed: int, task, purpose: str) -> int:
    """A seed for one task's draws from the recipe's seed, the task and what they are for: the
    same wherever and whenever the task is played."""
    key = f"{seed}/{task.task_set}/{task.id}/{purpose}".encode()
    return int(hashlib.sha256(key).hexdigest()[:12], 16)


def play_tasks(generator, tasks, make_env, sampling: Sampling, samples: int, mc: int,
               batch_size: int, fmt, seed: int, rollout: str) -> list[TaskPlay]:
    """For each of `tasks`, `samples` episodes and, with mc > 0, `mc` continuations from every
    state before an agent turn (see the module docstring for how they count). By rounds, one
    task after the other, each batch of a task drawing from one stream; continuously, the
    samples of all of them in one slot batch and then all their continuations, every episode
    drawing from its own streams: a task's records whichever tasks share its batch."""
    tok = generator.tokenizer
    records, envs, owners = [], [], []
    for task in tasks:
        r, e = start_episodes(tok, [task] * samples, make_env, fmt)
        records, envs, owners = records + r, envs + e, owners + [task] * samples
    _play(generator, records, envs, owners, "samples", sampling, batch_size, fmt, seed, rollout)
    plays = [_played(records[k * samples:(k + 1) * samples]) for k in range(len(tasks))]
    if mc == 0:
        return plays
    starts, start_envs, owners, spans = [], [], [], []
    for task, played in zip(tasks, plays):
        s, e, origins = _states(tok, task, played.records, make_env, mc, fmt)
        spans.append((len(starts), origins))
        starts, start_envs, owners = starts + s, start_envs + e, owners + [task] * len(s)
    _play(generator, starts, start_envs, owners, "mc", sampling, batch_size, fmt, seed, rollout)
    for played, (first, origins) in zip(plays, spans):
        _add_estimates(played, starts[first:first + len(origins)], origins, mc)
    return plays


def _play(generator, records, envs, owners, purpose: str, sampling: Sampling, batch_size: int,
          fmt, seed: int, rollout: str) -> None:
    """Play episodes of the tasks `owners` (one per record, each task's records together), with
    draws seeded from the task and `purpose`: continuously, every episode on its own streams
    (task seed, its index among the task's records); by rounds, task after task, each task's
    batches on one stream."""
    firsts: dict[int, int] = {}
    for i, task in enumerate(owners):
        firsts.setdefault(id(task), i)
    if rollout == "continuous":
        streams = [(derived_seed(seed, task, purpose), i - firsts[id(task)])
                   for i, task in enumerate(owners)]
        play_episodes(generator, records, envs, sampling, batch_size, fmt, continuous=True,
                      streams=streams)
        return
    bounds = [*firsts.values(), len(owners)]
    for a, b in zip(bounds, bounds[1:]):
        play_episodes(generator, records[a:b], envs[a:b], replace(sampling, seed=derived_seed(
            seed, owners[a], purpose)), batch_size, fmt)


def _played(records: list[EpisodeRecord]) -> TaskPlay:
    return TaskPlay(records, [[] for _ in records],
                    tokens=sum(len(t.ids) for r in records for t in r.turns))


def _add_estimates(played: TaskPlay, starts: list[EpisodeRecord], origins, mc: int) -> None:
    """The continuations from the task's states, played: count them and their tokens (those
    generated after the state each started from) into `played`."""
    played.continuations = len(starts)
    played.tokens += sum(len(t.ids) for s, origin in zip(starts, origins)
                         for t in s.turns[origin[1] if origin else 0:])
    played.estimates = _estimates(played.records, starts, origins, mc)


def _states(tok, task, records: list[EpisodeRecord], make_env, mc: int, fmt):
    """The starts of the continuations, `mc` per state, with their environments and where
    each comes from: None for a fresh episode (the state before turn 0, shared by the
    samples), (sample, k) for the state before sample's agent turn k."""
    starts, envs = start_episodes(tok, [task] * mc, make_env, fmt)
    origins = [None] * mc
    for i, record in enumerate(records):
        for k in range(1, len(record.turns)):
            state = _replay(make_env, record, k)
            for _ in range(mc):
                starts.append(_state_before(record, k))
                envs.append(copy.copy(state))
                origins.append((i, k))
    return starts, envs, origins


def _state_before(record: EpisodeRecord, k: int) -> EpisodeRecord:
    """The episode as it stood before agent turn k: its first k turns, and the ids the model
    read then (a token prefix of the record's, never re-encoded)."""
    return EpisodeRecord(record.task, record.prompt, turns=list(record.turns[:k]),
                         ids=record.ids[:record.turns[k].start])


def _replay(make_env, record: EpisodeRecord, k: int):
    """A fresh environment after the record's first k agent turns. Costs k environment steps
    (a search is a retrieval) per state, not per continuation: the continuations copy it."""
    env = make_env(record.task)
    env.reset(record.task)
    for j, turn in enumerate(record.turns[:k]):
        step = env.step(turn.text)
        if step.done or step.observation != turn.observation:
            raise UsageError(
                f"task {record.task.id} ({record.task.type}): replaying agent turn {j} gave "
                f"another observation than when it was played; Monte-Carlo estimates need a "
                f"deterministic environment (collect with --mc 0)")
    return env


def _estimates(records, starts, origins, mc: int) -> list[list[MCEstimate]]:
    wins = Counter(origin for start, origin in zip(starts, origins) if start.success)
    fresh_wins, successes = wins[None], sum(r.success for r in records)
    out = []
    for i, record in enumerate(records):
        others = successes - record.success
        estimates = [MCEstimate(0, mc + len(records) - 1, fresh_wins + others)]
        estimates += [MCEstimate(k, mc, wins[(i, k)]) for k in range(1, len(record.turns))]
        out.append(estimates)
    return out


def trajectory(record: EpisodeRecord, sample: int, estimates: list[MCEstimate],
               meta: dict) -> Trajectory:
    """One played episode as a trajectory, checked against the schema (`from_dict`) as any
    reader of the file will."""
    turns = []
    for t in record.turns:
        turns.append(Turn("agent", t.text))
        if t.observation is not None:
            turns.append(Turn("env", t.observation))
    answer = record.info.get("answer")
    built = Trajectory(
        id=trajectory_id(record.task, sample), task_id=record.task.id,
        task_type=record.task.type, prompt=record.prompt, turns=tuple(turns),
        outcome=Outcome(record.success, float(record.reward),
                        answer if isinstance(answer, str) else None),
        mc=tuple(estimates),
        meta={**meta, "task_set": record.task.task_set, "sample": sample,
              "ended": record.ended, "stops": [t.stop for t in record.turns]})
    return Trajectory.from_dict(json.loads(built.to_json()))


def trajectory_id(task, sample: int) -> str:
    """Unique in a collection: task ids are unique within a task set only."""
    return f"{task.task_set}/{task.id}/s{sample}"


# --------------------------------------------------------------------------------------------
# the output directory


def shard_name(dp_rank: int, dp_size: int) -> str:
    return f"collect-{dp_rank:05d}-of-{dp_size:05d}"


def complete_lines(path: Path, repair: bool) -> list[str]:
    """The lines of `path` that end in a newline. Bytes after the last newline are a line torn
    by a kill mid-write: left out with a warning, and with `repair` cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        log.warning("%s: dropped its torn last line (the collection stopped while writing "
                    "it); its task is played again", path)
        if repair:
            os.truncate(path, len(whole))
    return whole.decode("utf-8", errors="replace").splitlines()


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("collect-*.jsonl")) + sorted(out.glob("collect-*.dropped.txt"))


def repair_torn_lines(out: Path) -> None:
    """Cut the line a kill left half-written off the end of each file of `out`, so that
    appending continues after whole lines and every file reads (one process, before any
    reads them)."""
    for path in _parts(out):
        complete_lines(path, repair=True)


def done_ids(out: Path) -> set[str]:
    """The trajectory ids already in `out`, written or dropped, in the shards of any layout."""
    ids: set[str] = set()
    for path in sorted(out.glob("collect-*.jsonl")):
        for lineno, line in enumerate(complete_lines(path, repair=False), 1):
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path}:{lineno}: not a trajectory record ({line[:60]!r}); "
                                 "repair or delete that line, then resume") from None
    for path in sorted(out.glob("collect-*.dropped.txt")):
        ids.update(line for line in complete_lines(path, repair=False) if line)
    return ids


class ShardWriter:
    """This data-parallel rank's shard and its list of dropped ids, appended to (after
    `repair_torn_lines`)."""

    def __init__(self, out: Path, name: str):
        self.shard, self.dropped = out / f"{name}.jsonl", out / f"{name}.dropped.txt"
        self.files = {path: None for path in (self.shard, self.dropped)}
        self.synced = time.monotonic()

    def write(self, line: str, dropped: bool = False) -> None:
        path = self.dropped if dropped else self.shard
        if self.files[path] is None:
            self.files[path] = path.open("a", encoding="utf-8", newline="\n")
        self.files[path].write(line + "\n")
        self.files[path].flush()  # a reader (or a resume after a crash) sees whole episodes
        if time.monotonic() - self.synced > FSYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        for f in self.files.values():
            if f is not None:
                os.fsync(f.fileno())
        self.synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        for f in self.files.values():
            if f is not None:
                f.close()


def write_manifest(out: Path, body: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(body, indent=1) + "\n")
        f.flush()
        # on disk before the rename: a crash must not leave an empty collect.json in its place
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)


# --------------------------------------------------------------------------------------------
# the command


def collect(cfg, opts: CollectOptions, task_sets, checkpoint: Path, recipe: str) -> dict:
    """Play and write this data-parallel rank's share of the tasks; returns the counts and
    throughput of this run, summed over the ranks."""
    import torch

    from megatron_foresight.runtime.dist import barrier, shutdown
    from megatron_foresight.training.loop import cache_dir, start_processes

    out = Path(opts.out)
    ctx = start_processes(cfg)
    try:
        generator = _generator(cfg, ctx, checkpoint)
        identity = opts.identity(cfg, checkpoint, task_sets, generator.tokenizer)
        # every rank reads collect.json before the barrier below, after which it is rewritten
        previous = read_manifest(out)
        check_resumable(out, identity)  # now with the tokenizer, built on every rank
        task_sets.prepare(cache_dir(cfg), progress=ctx.is_logging_rank)
        if ctx.rank == 0:
            repair_torn_lines(out)
        barrier()
        mine = task_sets.tasks(opts.split, opts.tasks)[ctx.dp_rank::ctx.dp_size]
        done = done_ids(out)
        todo = [t for t in mine
                if not all(trajectory_id(t, s) in done for s in range(opts.samples))]
        if previous and isinstance(previous["options"].get("env_options"), dict):
            # keep the options of sets an earlier run played and this one does not
            identity["env_options"] = {**previous["options"]["env_options"],
                                       **identity["env_options"]}
        manifest = {"recipe": str(recipe), "stage": cfg.stage, "checkpoint": str(checkpoint),
                    "options": {**identity, **_selection(opts, task_sets)},
                    "layout": ctx.layout, "status": "running"}
        if ctx.is_logging_rank:
            out.mkdir(parents=True, exist_ok=True)
            write_manifest(out, manifest)
        # Every rank of a TP x PP group plays the same episodes (the generator broadcasts its
        # draws); the first of its tensor group on the last stage writes them.
        writer = ShardWriter(out, shard_name(ctx.dp_rank, ctx.dp_size)) \
            if ctx.tp_rank == 0 and ctx.is_last_stage else None
        log.info("%d of this rank's %d tasks to play (%d already in %s), %d sample(s) each, "
                 "%d continuation(s) per state", len(todo), len(mine), len(mine) - len(todo),
                 out, opts.samples, opts.mc)
        try:
            with torch.no_grad():
                stats = _play_all(generator, cfg, opts, task_sets,
                                  task_groups(mine, todo, opts), done, writer, checkpoint,
                                  ctx.is_logging_rank)
        finally:  # the last fsync also on an error or Ctrl-C: what was written stays written
            if writer is not None:
                writer.close()
        totals = _sum_over_ranks(ctx, stats)
        if ctx.is_logging_rank:
            write_manifest(out, {**manifest, "status": "complete", **totals,
                                 "trajectories_in_out": _count_records(out)})
        return totals
    finally:
        shutdown()


def _generator(cfg, ctx, checkpoint: Path):
    """The policy: the recipe's model with the checkpoint's weights, ready to sample."""
    from megatron_foresight.eval.run import load_weights
    from megatron_foresight.inference.generate import Generator
    from megatron_foresight.models.provider import build_model
    from megatron_foresight.training.loop import recipe_tokenizer

    tok = recipe_tokenizer(cfg)
    chunks = build_model(cfg, cfg.padded_vocab_size(tok.vocab_size), ctx.pg_collection,
                         initialize=False)
    load_weights(chunks, ctx, str(checkpoint))
    log.info("collecting with %s", checkpoint)
    return Generator(chunks[0].eval(), tok, max_sequence_length=cfg.data.seq_length,
                     pad_id=tok.eod)


def _selection(opts: CollectOptions, task_sets) -> dict:
    """The options a resume may change: which tasks."""
    return {"task_sets": [s.name for s in task_sets.sets], "tasks": opts.tasks,
            "tasks_file": opts.tasks_file, "env": opts.env, "corpus": opts.corpus}


def task_groups(mine: list, todo: list, opts: CollectOptions) -> list[list]:
    """This rank's tasks in the groups played together (`tasks_per_call`), cut from all of
    them, not from those left to play: a resumed run plays the group a kill interrupted whole
    (writing only what is missing), so its episodes share the batch they first shared and come
    out the same. Groups with nothing left to play are skipped."""
    per_call, left = tasks_per_call(opts), {id(t) for t in todo}
    groups = [mine[i:i + per_call] for i in range(0, len(mine), per_call)]
    return [g for g in groups if any(id(t) in left for t in g)]


def _play_all(generator, cfg, opts: CollectOptions, task_sets, groups: list[list],
              done: set[str], writer, checkpoint: Path, progress: bool) -> Counter:
    from tqdm import tqdm

    sampling = Sampling(temperature=opts.temperature, top_p=opts.top_p,
                        max_new_tokens=opts.max_new_tokens)
    fmt = cfg.format if opts.foresight else None
    meta = {"split": opts.split, "temperature": opts.temperature,
            "checkpoint": str(checkpoint.resolve())}
    stats, start = Counter(), time.monotonic()
    bar = tqdm(total=sum(map(len, groups)) * opts.samples, desc="episodes", unit=" ep",
               disable=None if progress else True)
    for tasks in groups:
        plays = play_tasks(generator, tasks, task_sets.make_env, sampling, opts.samples, opts.mc,
                           opts.batch_size, fmt, cfg.seed, opts.rollout)
        for task, played in zip(tasks, plays):
            stats.update(tasks=1, episodes=len(played.records), tokens=played.tokens,
                         continuations=played.continuations,
                         successes=sum(r.success for r in played.records))
            _write(writer, played, {**meta, "seed": derived_seed(cfg.seed, task, "samples")},
                   done, opts.drop_failed, stats)
            bar.update(len(played.records))
        stats["seconds"] = time.monotonic() - start
        bar.set_postfix_str(f"{stats['tokens'] / stats['seconds']:.0f} tokens/s")
    bar.close()
    return stats


def tasks_per_call(opts: CollectOptions) -> int:
    """Tasks played together: one by rounds; continuously, enough for about two batches of
    episodes, so that slots freed by short episodes are refilled, while a kill loses little
    (the tasks of one call are written when it returns)."""
    if opts.rollout == "rounds":
        return 1
    return max(1, -(-2 * opts.batch_size // opts.samples))


def _write(writer: ShardWriter | None, played: TaskPlay, meta: dict, done: set[str],
           drop_failed: bool, stats: Counter) -> None:
    """The task's trajectories not already in the output (a resume after a kill mid-task
    plays the task again and adds only what is missing); counted on every rank, written by
    the writers."""
    for sample, (record, estimates) in enumerate(zip(played.records, played.estimates)):
        built = trajectory(record, sample, estimates, meta)
        if built.id in done:
            continue
        drop = drop_failed and not record.success
        stats["dropped" if drop else "written"] += 1
        if writer is not None:
            writer.write(built.id if drop else built.to_json(), dropped=drop)


COUNTS = ("tasks", "episodes", "successes", "written", "dropped", "continuations", "tokens")


def _sum_over_ranks(ctx, stats: Counter) -> dict:
    """This run's counts over the data-parallel ranks, and its throughput over the slowest
    rank's time. Within a TP x PP group every rank counts the same episodes: summed over the
    DP group only."""
    import torch
    import torch.distributed as dist

    counts = torch.tensor([float(stats[k]) for k in COUNTS], dtype=torch.float64,
                          device=ctx.device)
    seconds = torch.tensor([stats["seconds"]], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(counts, group=ctx.dp_group)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=ctx.dp_group)
    totals = dict(zip(COUNTS, (int(c) for c in counts.tolist())))
    wall = seconds.item()
    throughput = {"seconds": round(wall, 3),
                  "episodes_per_s": round(totals["episodes"] / wall, 4) if wall else 0.0,
                  "tokens_per_s": round(totals["tokens"] / wall, 2) if wall else 0.0}
    log.info("collected %d episodes of %d tasks (success %.3f): %d trajectories written, %d "
             "dropped; %d continuations; %d tokens in %.1f s: %.3f episodes/s, %.1f tokens/s",
             totals["episodes"], totals["tasks"],
             totals["successes"] / max(totals["episodes"], 1), totals["written"],
             totals["dropped"], totals["continuations"], totals["tokens"], wall,
             throughput["episodes_per_s"], throughput["tokens_per_s"])
    return {"counts": totals, "throughput": throughput}


def _count_records(out: Path) -> int:
    return sum(len(complete_lines(p, repair=False)) for p in out.glob("collect-*.jsonl"))
