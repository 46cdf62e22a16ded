"""Agent trajectories, schema version 1: one JSON object per line, or one `<key>.json` member
per sample in webdataset tar shards.

    {"schema": "foresight.trajectory/1", "id": ..., "task_id": ..., "task_type": "search"|"math",
     "prompt": ..., "turns": [{"role": "agent"|"env", "text": ...}, ...],
     "outcome": {"success": bool, "reward": number, "answer": str|null},
     "mc": [{"turn": t, "n": n, "successes": k}, ...],     (optional)
     "meta": {...}}                                         (optional)

`mc[i]` is the Monte-Carlo success estimate of the state just before agent turn `turn`
(0-based). Turns alternate, starting with the agent. Unknown keys are errors: a typo must not
pass as a missing optional field."""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from megatron_foresight.data.records import RecordError, json_line, read_unique, write_lines
from megatron_foresight.errors import UsageError

SCHEMA = "foresight.trajectory/1"
KNOWN_SCHEMAS = (SCHEMA,)
TASK_TYPE = re.compile(r"[A-Za-z_][\w-]*")  # an environment's name (envs.registry)
ROLES = ("agent", "env")


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@dataclass(frozen=True)
class Outcome:
    success: bool
    reward: float
    answer: str | None = None


@dataclass(frozen=True)
class MCEstimate:
    turn: int
    n: int
    successes: int

    @property
    def value(self) -> float:
        return self.successes / self.n


def _expect(obj: dict, key: str, kind, field: str, what: str):
    if key not in obj:
        raise RecordError(field, f"missing; expected {what}")
    value = obj[key]
    # bool is an int in Python; in a trajectory it never stands for a number.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RecordError(field, f"must be {what}, got {json.dumps(value)[:60]}")
    return value


def _no_extra(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise RecordError(f"{prefix}{key}", f"unknown key; allowed keys: {', '.join(allowed)}")


def _text(obj: dict, key: str, field: str, non_empty: bool = False) -> str:
    value = _expect(obj, key, str, field, "a non-empty string" if non_empty else "a string")
    if non_empty and not value.strip():
        raise RecordError(field, "must not be empty")
    return value


def _finite(value: int | float, field: str) -> float:
    # Python's JSON reader takes NaN and Infinity, and an integer too large for a float.
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise RecordError(field, f"must be a finite number, got {json.dumps(value)[:60]}")
    return number


_TOP = ("schema", "id", "task_id", "task_type", "prompt", "turns", "outcome", "mc", "meta")


@dataclass(frozen=True)
class Trajectory:
    id: str
    task_id: str
    task_type: str
    prompt: str
    turns: tuple[Turn, ...]
    outcome: Outcome
    mc: tuple[MCEstimate, ...] = ()
    meta: dict | None = None

    @classmethod
    def from_dict(cls, obj) -> "Trajectory":
        if not isinstance(obj, dict):
            raise RecordError(None, f"a trajectory must be a JSON object, got "
                                    f"{type(obj).__name__}")
        schema = _expect(obj, "schema", str, "schema", f"the string {SCHEMA!r}")
        if schema not in KNOWN_SCHEMAS:
            raise RecordError("schema", f"unknown version {schema!r}; known: "
                                        f"{', '.join(KNOWN_SCHEMAS)}")
        _no_extra(obj, _TOP, "")
        task_type = _text(obj, "task_type", "task_type")
        if not TASK_TYPE.fullmatch(task_type):
            raise RecordError("task_type", f"must be an environment's name such as search or "
                                           f"math, got {task_type!r}")
        turns = cls._turns(_expect(obj, "turns", list, "turns", "a list of turns"))
        raw_outcome = _expect(obj, "outcome", dict, "outcome", "an object")
        _no_extra(raw_outcome, ("success", "reward", "answer"), "outcome")
        reward = _finite(_expect(raw_outcome, "reward", (int, float), "outcome.reward",
                                 "a number"), "outcome.reward")
        answer = raw_outcome.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise RecordError("outcome.answer", "must be a string or null")
        outcome = Outcome(_expect(raw_outcome, "success", bool, "outcome.success",
                                  "true or false"), reward, answer)
        agent_turns = sum(t.role == "agent" for t in turns)
        mc = cls._mc(obj.get("mc", []), agent_turns)
        meta = obj.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise RecordError("meta", "must be an object")
        return cls(_text(obj, "id", "id", True), _text(obj, "task_id", "task_id", True),
                   task_type, _text(obj, "prompt", "prompt"), turns, outcome, mc, meta)

    @staticmethod
    def _turns(raw: list) -> tuple[Turn, ...]:
        if not raw:
            raise RecordError("turns", "must not be empty; a trajectory has at least one "
                                       "agent turn")
        turns = []
        for i, item in enumerate(raw):
            field = f"turns[{i}]"
            if not isinstance(item, dict):
                raise RecordError(field, "must be an object with role and text")
            _no_extra(item, ("role", "text"), field)
            role = _text(item, "role", f"{field}.role")
            if role not in ROLES:
                raise RecordError(f"{field}.role", f"must be agent or env, got {role!r}")
            expected = ROLES[i % 2]
            if role != expected:
                raise RecordError(f"{field}.role", f"turns alternate starting with agent; "
                                                   f"turn {i} must be {expected}, got {role}")
            turns.append(Turn(role, _text(item, "text", f"{field}.text")))
        return tuple(turns)

    @staticmethod
    def _mc(raw, agent_turns: int) -> tuple[MCEstimate, ...]:
        if not isinstance(raw, list):
            raise RecordError("mc", "must be a list of {turn, n, successes}")
        estimates, last = [], -1
        for i, item in enumerate(raw):
            field = f"mc[{i}]"
            if not isinstance(item, dict):
                raise RecordError(field, "must be an object with turn, n, successes")
            _no_extra(item, ("turn", "n", "successes"), field)
            turn = _expect(item, "turn", int, f"{field}.turn", "an integer")
            n = _expect(item, "n", int, f"{field}.n", "an integer")
            wins = _expect(item, "successes", int, f"{field}.successes", "an integer")
            if not 0 <= turn < agent_turns:
                raise RecordError(f"{field}.turn", f"must name an agent turn, 0 to "
                                                   f"{agent_turns - 1}, got {turn}")
            if turn <= last:
                raise RecordError(f"{field}.turn", "turns must be strictly increasing")
            if n < 1:
                raise RecordError(f"{field}.n", f"must be at least 1, got {n}")
            if not 0 <= wins <= n:
                raise RecordError(f"{field}.successes", f"must be between 0 and n={n}, got "
                                                        f"{wins}")
            estimates.append(MCEstimate(turn, n, wins))
            last = turn
        return tuple(estimates)

    def to_dict(self) -> dict:
        out = {"schema": SCHEMA, "id": self.id, "task_id": self.task_id,
               "task_type": self.task_type, "prompt": self.prompt,
               "turns": [{"role": t.role, "text": t.text} for t in self.turns],
               "outcome": {"success": self.outcome.success, "reward": self.outcome.reward,
                           "answer": self.outcome.answer}}
        if self.mc:
            out["mc"] = [{"turn": m.turn, "n": m.n, "successes": m.successes} for m in self.mc]
        if self.meta is not None:
            out["meta"] = self.meta
        return out

    def to_json(self) -> str:
        """The canonical line: the same trajectory always gives the same bytes."""
        return json_line(self.to_dict())


def read_trajectories(path: str | Path) -> Iterator[Trajectory]:
    """Trajectories of a .jsonl file, a .tar shard or a directory of shards, streamed; the
    first bad record raises `DataFileError`; ids must be unique within the input."""
    yield from read_unique(path, lambda record, where: Trajectory.from_dict(record),
                           "trajectory")


def write_jsonl(trajectories: Iterable[Trajectory], path: str | Path) -> None:
    """One canonical line per trajectory (`Trajectory.to_json`), written atomically."""
    write_lines((t.to_json() for t in trajectories), path)


def write_shards(trajectories: Iterable[Trajectory], out: str | Path,
                 per_shard: int = 10000) -> list[Path]:
    """Webdataset shards of `per_shard` samples, each a member `<index>.json` (index zero-padded:
    webdataset keys must not hold dots). `out` is a directory, for `out/trajectories-000000.tar`,
    ..., or a pattern such as `out/train-%06d.tar`. Member headers are fixed (mtime 0, owner
    root, no names), so the same trajectories give the same bytes. Each shard is written under a
    temporary name and renamed; shards of the pattern left by an earlier, longer run are removed
    so that a directory reader sees this run alone. Returns the shards in order."""
    pattern = _shard_pattern(out)
    if per_shard < 1:
        raise UsageError(f"per_shard must be at least 1, got {per_shard}")
    shards: list[Path] = []
    tar: tarfile.TarFile | None = None
    try:
        for index, t in enumerate(trajectories):
            if index % per_shard == 0:
                if tar is not None:
                    _finish_shard(tar, shards[-1])
                shards.append(Path(pattern % len(shards)))
                shards[-1].parent.mkdir(parents=True, exist_ok=True)
                tar = tarfile.open(_tmp(shards[-1]), "w", format=tarfile.USTAR_FORMAT)
            data = t.to_json().encode("utf-8")
            tar.addfile(_member(f"{index:09d}.json", len(data)), io.BytesIO(data))
        if tar is not None:
            _finish_shard(tar, shards[-1])
    except BaseException:
        if tar is not None:
            tar.close()
            _tmp(shards[-1]).unlink(missing_ok=True)
        raise
    stale = len(shards)
    while Path(pattern % stale).is_file():
        Path(pattern % stale).unlink()
        stale += 1
    return shards


def _shard_pattern(out: str | Path) -> str:
    """`out` as a `%`-pattern of shard paths: a directory gets `trajectories-%06d.tar`."""
    if "%" not in Path(out).name:
        return str(Path(out)).replace("%", "%%") + os.sep + "trajectories-%06d.tar"
    pattern = str(out)
    try:
        names = {pattern % 0, pattern % 1}
    except (TypeError, ValueError):
        names = set()
    if len(names) != 2 or not pattern.endswith(".tar"):
        raise UsageError(f"shard pattern {pattern!r}: expected one number field and a .tar "
                         f"name, such as 'out/train-%06d.tar'")
    return pattern


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _finish_shard(tar: tarfile.TarFile, final: Path) -> None:
    tar.close()
    os.replace(_tmp(final), final)
