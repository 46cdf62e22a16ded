"""The environments, by name: the one place that says which exist. A task set of a recipe
(`tasks[].env`) names one; world building, FC-RL, `foresight eval` and trajectory collection get
their environments from here and from nowhere else.

Adding an environment is one module that defines its `Episode` (prompt, tools, scoring) and
calls `register(EnvSpec(...))` when imported; a recipe lists that module in `extensions` (or it
is imported before the recipe loads). The built-in `search` and `math` register the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from megatron_foresight.envs.base import Episode
from megatron_foresight.errors import UsageError
from megatron_foresight.foresight.tags import register_tool_tags

BUILTIN_MODULES = ("megatron_foresight.envs.search", "megatron_foresight.envs.math")


@dataclass(frozen=True)
class EnvContext:
    """What building an environment's shared resources (a retriever) may need."""

    cache_dir: Path
    """Where derived data (a corpus index) is cached."""
    progress: bool = True
    """Whether long builds may show a progress bar (the logging rank)."""


def success_rate(records: Sequence) -> dict[str, float]:
    """The default per-set score of played episodes: the share the environment accepted."""
    return {"accuracy": sum(r.success for r in records) / len(records)} if records else {}


@dataclass(frozen=True)
class EnvSpec:
    name: str
    """What a task set's `env` names and a task's `type` is."""
    episode: type[Episode]
    """The environment's episode class: prompt, tool tags and scoring."""
    options: type
    """Dataclass of the options a task set gives it (`tasks[].options`), each field documented;
    `__post_init__` checks values (no files: see `check`)."""
    make: Callable[[Any, EnvContext], Callable[[], Episode]]
    """(options, context) -> a factory of fresh episodes. Resources the episodes share (a
    retriever over a corpus) are built here once per task set; every rank calls it at the same
    point, so a resource built by rank 0 for all can be waited for."""
    check: Callable[[Any], None] | None = None
    """Checks of the files its options name (they exist, their first records read), run before
    any process starts; raise `UsageError` or `DataFileError`."""
    metrics: Callable[[Sequence], dict[str, float]] = success_rate
    """Its own scores of played episodes (`EpisodeRecord`s); `foresight eval` reports them per
    task set beside the foresight metrics."""
    description: str = field(default="", compare=False)
    """One line for `foresight config --keys`."""


_REGISTRY: dict[str, EnvSpec] = {}
_builtins_loaded = False


def register(spec: EnvSpec) -> EnvSpec:
    """Add an environment (its tool tags join the foresight format's parsers). Registering
    the same name twice with a different spec is refused."""
    if not dataclasses.is_dataclass(spec.options):
        raise TypeError(f"environment {spec.name!r}: options must be a dataclass")
    if spec.episode.task_type != spec.name:
        raise ValueError(f"environment {spec.name!r}: its episode class plays tasks of type "
                         f"{spec.episode.task_type!r}; register it under that name (a task's "
                         "type is the name of the environment that plays it)")
    known = _REGISTRY.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"environment {spec.name!r} is already registered (by "
                         f"{known.episode.__module__})")
    register_tool_tags(spec.episode.tools, spec.episode.observation_tag)
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> EnvSpec:
    """The environment called `name`; `UsageError` naming the registered ones otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"environment {name!r} is not registered{hint}; registered: "
                         f"{', '.join(sorted(_REGISTRY))} (a module that registers more is "
                         f"named in the recipe's extensions)")
    return _REGISTRY[name]


def describe_options() -> str:
    """Each registered environment's task-set options (`tasks[].options`), documented."""
    from megatron_foresight.configtree import describe

    lines = []
    for name in names():
        spec = _REGISTRY[name]
        lines.append(f"[tasks[].options with env: {name}] {spec.description}".rstrip())
        lines += describe(spec.options, "tasks[].options")
    return "\n".join(lines)
