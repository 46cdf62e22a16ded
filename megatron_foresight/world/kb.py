"""A fictional knowledge base: regions, cities, people and guilds with attributes and relations
(a person is born in a city, a guild has its seat in a city and a founder), and the corpus that
states it, one document per entity in varied sentences."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from megatron_foresight.tasks import Document
from megatron_foresight.world.templates import FACTS

_SYLLABLES = ("ka", "lo", "mir", "ten", "vas", "ru", "del", "on", "sha", "bri", "tor", "el",
              "nu", "gar", "phi", "zen", "ol", "ma", "kei", "dru", "sel", "van", "qui", "bo")
TRADES = ("salt", "copper", "wool", "glass", "timber", "spices", "paper", "silver", "amber",
          "honey", "linen", "iron")
PROFESSIONS = ("cartographer", "brewer", "weaver", "stargazer", "glassblower", "bookbinder",
               "shipwright", "herbalist", "mason", "scribe", "falconer", "potter")
CRAFTS = ("maps", "bells", "clocks", "lanterns", "ropes", "dyes", "lenses", "boats")


@dataclass
class Entity:
    id: str
    kind: str  # city | person | guild
    name: str
    attrs: dict = field(default_factory=dict)


@dataclass
class KnowledgeBase:
    regions: list[str]
    entities: list[Entity]

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def by_name(self) -> dict[str, Entity]:
        return {e.name: e for e in self.entities}

    def to_dict(self) -> dict:
        return {"regions": self.regions,
                "entities": [{"id": e.id, "kind": e.kind, "name": e.name, **e.attrs}
                             for e in self.entities]}


def _word(rng: random.Random, parts: tuple[int, int]) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(*parts))).capitalize()


def build_kb(rng: random.Random, cities: int, people: int, guilds: int) -> KnowledgeBase:
    taken: set[str] = set()

    def unique(make) -> str:
        while True:
            name = make()
            if name not in taken and name.lower() not in taken:
                taken.add(name)
                return name

    regions = [unique(lambda: _word(rng, (2, 3))) for _ in range(max(2, cities // 8))]
    entities = []
    city_list = []
    for i in range(cities):
        city = Entity(f"city-{i}", "city", unique(lambda: _word(rng, (2, 3))), {
            "region": rng.choice(regions), "founded": rng.randint(600, 1899),
            "population": rng.randint(2, 900) * 100, "trade": rng.choice(TRADES)})
        city_list.append(city)
    for city in city_list:
        city.attrs["road_to"] = rng.choice([c.name for c in city_list if c is not city])
    entities += city_list
    person_list = []
    for i in range(people):
        name = unique(lambda: f"{_word(rng, (2, 2))} {_word(rng, (2, 3))}")
        person_list.append(Entity(f"person-{i}", "person", name, {
            "born_in": rng.choice(city_list).name, "profession": rng.choice(PROFESSIONS),
            "born": rng.randint(1700, 1990)}))
    entities += person_list
    for i in range(guilds):
        name = unique(lambda: f"{_word(rng, (2, 3))} Guild")
        entities.append(Entity(f"guild-{i}", "guild", name, {
            "seat": rng.choice(city_list).name, "founder": rng.choice(person_list).name,
            "craft": rng.choice(CRAFTS)}))
    return KnowledgeBase(regions, entities)


def corpus(kb: KnowledgeBase, rng: random.Random) -> list[Document]:
    """One document per entity, its facts in a seeded order and phrasing."""
    docs = []
    for e in kb.entities:
        keys = list(e.attrs)
        rng.shuffle(keys)
        text = " ".join(rng.choice(FACTS[k]).format(name=e.name, **e.attrs) for k in keys)
        docs.append(Document(e.id, e.name, text))
    return docs
