"""What `foresight report` reads: for each stage of each run given, its training curves
(`metrics.jsonl`), its evaluation (`foresight eval --out` JSON) and the episodes that evaluation
played (`<out>.episodes.jsonl`), read back as the `EpisodeRecord`s the scores take.

A RUN is a pipeline run directory (one subdirectory per stage, `eval_<stage>.json` beside them),
a training run directory (`metrics.jsonl`, `config.yaml`), or an evaluation's JSON file (its
checkpoint's run directory, when it still exists, gives the curves)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_foresight.errors import UsageError
from megatron_foresight.foresight.formats import FORMATS, ForesightFormat
from megatron_foresight.inference.agent import AgentTurnRecord, EpisodeRecord
from megatron_foresight.pipeline import STAGES
from megatron_foresight.tasks import Task


@dataclass
class Part:
    """One stage of one run: what its training logged and how its evaluation went."""

    run: str
    """The run's name (its directory's or file's), which labels it in every figure."""
    stage: str | None
    curve: list[dict] = field(default_factory=list)
    """The `metrics.jsonl` records, in step order."""
    metrics: dict = field(default_factory=dict)
    """The evaluation's metrics (empty when the stage was not evaluated)."""
    episodes: list[EpisodeRecord] = field(default_factory=list)
    fmt: ForesightFormat = FORMATS["v1"]
    label: str = ""
    """How figures name it: the run, the stage, or both, whichever tells the parts apart."""


def load_parts(paths: list[str | Path]) -> list[Part]:
    """The parts of every run given, labelled so that no two read alike."""
    names = _run_names([Path(p) for p in paths])
    parts = [part for p, name in zip(paths, names) for part in _parts_of(Path(p), name)]
    if not parts:
        raise UsageError(f"{', '.join(map(str, paths))}: no metrics.jsonl, evaluation or "
                         "pipeline stages found to report on")
    _label(parts)
    return parts


def _run_names(paths: list[Path]) -> list[str]:
    """Each run's name: its last path component, or its last two where names collide (two
    run directories both called `run`)."""
    # absolute, not resolved: a link's own name is the name its user gave the run
    full = [Path(os.path.abspath(p)) for p in paths]
    short = [p.name.removesuffix(".json") for p in full]
    if len(set(short)) == len(short):
        return short
    return [f"{p.parent.name}/{s}" for p, s in zip(full, short)]


def _parts_of(path: Path, name: str) -> list[Part]:
    if path.is_file():
        return [_evaluated(path, name, None)]
    if not path.is_dir():
        raise UsageError(f"{path}: no such run directory or evaluation file")
    stages = [s for s in STAGES if (path / s).is_dir() or (path / f"eval_{s}.json").is_file()]
    if stages:  # a pipeline run directory
        return [_pipeline_stage(path, s, name) for s in stages]
    if (path / "metrics.jsonl").is_file():
        return [Part(name, _stage_of(path), curve=read_curve(path))]
    return []


def _pipeline_stage(path: Path, stage: str, name: str) -> Part:
    evaluation = path / f"eval_{stage}.json"
    if evaluation.is_file():
        return _evaluated(evaluation, name, path / stage)
    return Part(name, stage, curve=read_curve(path / stage))


def _evaluated(path: Path, name: str, run_dir: Path | None) -> Part:
    """An evaluation's part: its metrics and episodes, and the curves of the run it judged."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not an evaluation written by `foresight eval --out` ({e})"
                         ) from None
    if run_dir is None and doc.get("checkpoint"):
        run_dir = Path(doc["checkpoint"])
    fmt = FORMATS.get(doc.get("format", "v1"), FORMATS["v1"])
    episodes = Path(f"{path}.episodes.jsonl")
    return Part(name, doc.get("stage"), curve=read_curve(run_dir) if run_dir else [],
                metrics=doc.get("metrics", {}), fmt=fmt,
                episodes=read_episodes(episodes) if episodes.is_file() else [])


def _stage_of(run_dir: Path) -> str | None:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("stage")


def read_curve(run_dir: Path) -> list[dict]:
    """The records of a run's `metrics.jsonl` (none when it has none); a torn last line, left
    by a run that stopped while writing it, is passed over."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


def read_episodes(path: Path) -> list[EpisodeRecord]:
    """The episodes `foresight eval` wrote, as records the scores read (task text and token
    ids are not kept in the file, so they stay empty)."""
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(_episode(json.loads(line)))
    return records


def _episode(doc: dict) -> EpisodeRecord:
    task = Task(id=doc["task_id"], type="", question="", answers=(),
                task_set=doc.get("task_set"))
    turns = [AgentTurnRecord(text=t["agent"], ids=[], logprobs=[], observation=t["env"],
                             stop=t.get("stop", "")) for t in doc["turns"]]
    return EpisodeRecord(task, doc.get("prompt", ""), turns, success=doc["success"],
                         reward=doc.get("reward", float(doc["success"])),
                         ended=doc.get("ended", ""))


def _label(parts: list[Part]) -> None:
    runs = {p.run for p in parts}
    for p in parts:
        same_run_stages = [q.stage for q in parts if q.run == p.run]
        if len(runs) == 1:
            p.label = p.stage or p.run
        elif len(same_run_stages) == 1:
            p.label = p.run
        else:
            p.label = f"{p.run} {p.stage}"
