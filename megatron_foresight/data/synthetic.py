"""The `builtin` text corpus: facts of the built-in world (the one `foresight data build-world`
writes for the same seed), stated in varied sentences, so a tiny model has something to learn
in minutes and the language-model stage reads the same world the agents act in."""

from __future__ import annotations

import random
from typing import Iterator

from megatron_foresight.world.kb import build_kb, fact_documents
from megatron_foresight.world.sizes import WorldSizes


def synthetic_documents(seed: int, num_docs: int) -> Iterator[str]:
    sizes = WorldSizes()
    kb = build_kb(random.Random(f"{seed}/kb"), sizes.cities, sizes.people, sizes.guilds)
    yield from fact_documents(kb, random.Random(f"{seed}/text"), num_docs)
