"""A small generated corpus for the embedded default: facts about a fictional world, stated in
varied sentences so a tiny model has something to learn (and memorize) in minutes. The same seed
gives the same documents."""

from __future__ import annotations

import random
from typing import Iterator

_SYLLABLES = ("ka", "lo", "mir", "ten", "vas", "ru", "del", "on", "sha", "bri", "tor", "el",
              "nu", "gar", "phi", "zen", "ol", "ma", "kei", "dru")
_TRADES = ("salt", "copper", "wool", "glass", "timber", "spices", "paper", "silver")


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _world(seed: int, num_cities: int) -> list[dict]:
    rng = random.Random(seed)
    regions = [_name(rng) for _ in range(max(2, num_cities // 6))]
    cities = []
    names = set()
    while len(cities) < num_cities:
        name = _name(rng)
        if name in names:
            continue
        names.add(name)
        cities.append(dict(name=name, region=rng.choice(regions), founded=rng.randint(900, 1900),
                           population=rng.randint(2, 900) * 100, trade=rng.choice(_TRADES)))
    for city in cities:
        city["neighbor"] = rng.choice([c["name"] for c in cities if c is not city])
    return cities


_TEMPLATES = (
    "{name} is a city in the region of {region}.",
    "{name} was founded in {founded}.",
    "About {population} people live in {name}.",
    "The people of {name} trade in {trade}.",
    "From {name} the road leads to {neighbor}.",
    "Q: Where is {name}? A: {name} is in {region}.",
    "Q: When was {name} founded? A: In {founded}.",
    "Q: What does {name} trade in? A: {trade}.",
)


def synthetic_documents(seed: int, num_docs: int, num_cities: int = 48) -> Iterator[str]:
    """`num_docs` short documents, each a few facts about cities of one seeded world, plus a line
    of arithmetic."""
    cities = _world(seed, num_cities)
    rng = random.Random(seed + 1)
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            sentences.append(rng.choice(_TEMPLATES).format(**rng.choice(cities)))
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        sentences.append(f"{a} + {b} = {a + b}.")
        yield " ".join(sentences)
