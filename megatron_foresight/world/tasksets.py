"""The built-in world as task sets (`tasks: [{env: search, world: true}, ...]` in a recipe): its
task files per split and the environment options it was played with (the passages of its
corpus, its top-k and turn budgets), read from its manifest, or the default sizes when the world
is yet to be built (it is built with them on first use)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from megatron_foresight.errors import UsageError
from megatron_foresight.world.sizes import WorldSizes

WORLD_ENVS = ("search", "math")
SPLITS = ("train", "validation", "test")


def world_sizes(world: str | Path) -> dict:
    """The sizes a world was built with (its manifest), or the defaults it will be built
    with. A manifest without them is refused, naming the file."""
    manifest = Path(world) / "manifest.json"
    if not manifest.is_file():
        return asdict(WorldSizes())
    try:
        sizes = json.loads(manifest.read_text()).get("sizes")
    except (ValueError, AttributeError):
        sizes = None
    if not isinstance(sizes, dict) or not {"top_k", "search_max_turns", "math_max_turns"} <= \
            set(sizes):
        raise UsageError(f"{manifest}: no 'sizes' (top_k, search_max_turns, math_max_turns) in "
                         "this world's manifest; build the world again with `foresight data "
                         "build-world --out DIR`")
    return sizes


def world_task_set(world: str | Path, env: str) -> tuple[dict[str, str], dict]:
    """(task file per split, environment options) of the world's `env` tasks."""
    if env not in WORLD_ENVS:
        raise UsageError(f"the built-in world has no {env!r} tasks (it has "
                         f"{', '.join(WORLD_ENVS)})")
    world = Path(world)
    sizes = world_sizes(world)
    splits = {s: str(world / "tasks" / f"{env}-{s}.jsonl") for s in SPLITS}
    if env == "search":
        return splits, {"corpus": str(world / "corpus.jsonl"), "top_k": sizes["top_k"],
                        "max_turns": sizes["search_max_turns"]}
    return splits, {"max_turns": sizes["math_max_turns"]}
