"""The `builtin` text corpus: facts of the built-in world (the one `foresight data build-world`
writes for the same seed), stated in varied sentences, so a tiny model has something to learn
in minutes and the language-model stage reads the same world the agents act in."""

from __future__ import annotations

import random
from typing import Iterator

from megatron_foresight.world.kb import KnowledgeBase, build_kb
from megatron_foresight.world.sizes import WorldSizes
from megatron_foresight.world.templates import FACTS, ONE_HOP


def synthetic_documents(seed: int, num_docs: int) -> Iterator[str]:
    sizes = WorldSizes()
    kb = build_kb(random.Random(f"{seed}/kb"), sizes.cities, sizes.people, sizes.guilds)
    yield from fact_documents(kb, random.Random(f"{seed}/text"), num_docs)


def fact_documents(kb: KnowledgeBase, rng: random.Random, n: int):
    """`n` short documents of a few facts each about random entities, then a question with its
    answer and a line of arithmetic: plain text in which a small model can learn the world's
    facts (the `builtin` corpus of the lm stage, WM-AMT's replay text)."""
    questions = sorted(ONE_HOP.items())
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            e = rng.choice(kb.entities)
            key = rng.choice(list(e.attrs))
            sentences.append(rng.choice(FACTS[key]).format(name=e.name, **e.attrs))
        (kind, attribute), templates = rng.choice(questions)
        e = rng.choice(kb.of_kind(kind))
        sentences.append(f"Q: {rng.choice(templates).format(name=e.name)} "
                         f"A: {e.attrs[attribute]}.")
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        sentences.append(f"{a} + {b} = {a + b}.")
        yield " ".join(sentences)
