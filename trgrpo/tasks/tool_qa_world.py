"""The fictional wiki behind tool_qa: a seeded world of people, companies and cities, and its questions.

Every entity has one short document, titled by its name, that states its outgoing relations
(a person's employer, birthplace and birth year; a company's founder, founding year and headquarters;
a city's founding year and mayor). A question chains lookups from a named anchor ("Which city is the
headquarters of the employer of Tavo Melrik?"), so the answer is in no model's memory.

Names are invented words. Within a world no word is shared by two names (a search for any word of a
name is unambiguous), and every word belongs to one split by a stable hash, so train and test worlds
never share an entity name. Nothing here searches: the bm25 tool lives in tool_qa_search.py.
"""

from __future__ import annotations

import hashlib
import random
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

# kind → relation → target kind ("year" targets are numbers, not entities)
RELATIONS = {
    "person": {"employer": "company", "birthplace": "city", "birth_year": "year"},
    "company": {"founder": "person", "founded": "year", "headquarters": "city"},
    "city": {"founded": "year", "mayor": "person"},
}
NOUNS = {
    "employer": "the employer",
    "birthplace": "the birthplace",
    "birth_year": "the birth year",
    "founder": "the founder",
    "founded": "the founding year",
    "headquarters": "the headquarters",
    "mayor": "the mayor",
}
ASK = {"person": "Who is", "company": "Which company is", "city": "Which city is", "year": "What is"}
MAX_ENTITIES = 5000  # per world: far below the invented-word pool of a split (~90k words)
YEAR_SHARE = 0.25  # share of lookup questions whose answer is a year rather than an entity
YEARS = {"person": (1940, 2000), "company": (1850, 2015), "city": (1200, 1840)}  # inclusive ranges
DOCS = {
    "person": "{name} works for {employer}. {name} was born in {birth_year} in {birthplace}.",
    "company": "{name} was founded by {founder} in {founded}. {name} is headquartered in {headquarters}.",
    "city": "{name} was founded in {founded}. The mayor of {name} is {mayor}.",
}
_CONSONANTS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_ONSETS = (*_CONSONANTS, "br", "dr", "gr", "kr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k")
_SUFFIXES = {
    "company": ("tex", "corp", "ware", "gen", "tron", "lux", "dyne", "works"),
    "city": ("vale", "ford", "holm", "burg", "ton", "wick", "stad", "port", "mouth", "field"),
}
# invented words must not be words the templates or bm25's stop list use
_RESERVED = frozenset(
    [
        *re.findall(r"[a-z]+", " ".join([*DOCS.values(), *NOUNS.values(), *ASK.values()]).lower()),
        *("about", "above", "after", "again", "before", "below", "being", "other", "there", "these", "those"),
    ]
)


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # person | company | city
    facts: dict[str, str]  # relation → target name, or a year as text


@dataclass(frozen=True)
class World:
    seed: int
    split: str
    entities: dict[str, Entity]  # by name, in creation order

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.kind == kind]

    def documents(self) -> list[tuple[str, str]]:
        """(title, text) for every entity: the search tool's corpus."""
        return [(e.name, DOCS[e.kind].format(name=e.name, **e.facts)) for e in self.entities.values()]


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    answer_kind: str  # person | company | city | year | number
    evidence: list[str]  # titles of the documents read, one per hop, in order
    relations: list[str]
    calc_expression: str | None = None  # numeric questions: the arithmetic that gives the answer


def word_split(word: str) -> str:
    """The split an invented word belongs to (train and test worlds draw from disjoint halves)."""
    return "test" if zlib.crc32(word.lower().encode()) % 2 else "train"


def world_seed(seed: int, split: str, index: int) -> int:
    """A stable seed for the index-th world of a dataset (stable across processes and Python runs)."""
    digest = hashlib.sha256(f"tool_qa|{split}|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


class _Namer:
    """Draws invented words of one split, never repeating a word within a world."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split, self.used = rng, split, set()

    def word(self, syllables: int, suffix: str = "") -> str:
        while True:
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables)]
            word = ("".join(parts) + (suffix or self.rng.choice(_CODAS))).capitalize()
            key = word.lower()
            if key not in self.used and key not in _RESERVED and word_split(word) == self.split:
                self.used.add(key)
                return word

    def name(self, kind: str) -> str:
        if kind == "person":
            return f"{self.word(2)} {self.word(2)}"
        return self.word(2, suffix=self.rng.choice(_SUFFIXES[kind]))


@lru_cache(maxsize=256)
def build_world(seed: int, split: str, people: int, companies: int, cities: int) -> World:
    """The world of `seed`: deterministic, and cached (the search tool and demonstrations reuse it)."""
    if min(people, companies, cities) < 2 or people + companies + cities > MAX_ENTITIES:
        raise ValueError(
            f"a world needs 2 to {MAX_ENTITIES} entities, ≥ 2 of each kind (got {people}, {companies}, {cities})"
        )
    rng = random.Random(seed)
    namer = _Namer(rng, split)
    counts = {"person": people, "company": companies, "city": cities}
    names = {kind: [namer.name(kind) for _ in range(count)] for kind, count in counts.items()}

    def year(kind: str) -> str:
        return str(rng.randint(*YEARS[kind]))

    entities: dict[str, Entity] = {}
    for name in names["person"]:
        facts = {"employer": rng.choice(names["company"]), "birthplace": rng.choice(names["city"])}
        entities[name] = Entity(name, "person", {**facts, "birth_year": year("person")})
    for name in names["company"]:
        facts = {"founder": rng.choice(names["person"]), "headquarters": rng.choice(names["city"])}
        entities[name] = Entity(name, "company", {**facts, "founded": year("company")})
    for name in names["city"]:
        entities[name] = Entity(name, "city", {"founded": year("city"), "mayor": rng.choice(names["person"])})
    return World(seed, split, entities)


def _walk(
    world: World, rng: random.Random, anchor: Entity, steps: int
) -> tuple[list[Entity], list[str]] | None:
    """A chain of `steps` entity-to-entity relations from `anchor` that never revisits an entity."""
    chain, relations = [anchor], []
    for _ in range(steps):
        options = sorted(r for r, kind in RELATIONS[chain[-1].kind].items() if kind != "year")
        relation = rng.choice(options)
        target = world.entities[chain[-1].facts[relation]]
        if target in chain:
            return None  # the answer would be named in the question
        chain.append(target)
        relations.append(relation)
    return chain, relations


def _phrase(anchor: str, relations: list[str]) -> str:
    phrase = anchor
    for relation in relations:
        phrase = f"{NOUNS[relation]} of {phrase}"
    return phrase


def lookup_question(world: World, rng: random.Random, hops: int) -> Question | None:
    """A question answered by `hops` lookups; the last relation leads to an entity or a year."""
    anchor = rng.choice(list(world.entities.values()))
    walked = _walk(world, rng, anchor, hops - 1)
    if walked is None:
        return None
    chain, relations = walked
    want_year = rng.random() < YEAR_SHARE
    last = rng.choice(
        sorted(r for r, kind in RELATIONS[chain[-1].kind].items() if (kind == "year") == want_year)
    )
    answer = chain[-1].facts[last]
    if answer in {e.name for e in chain}:
        return None
    kind = RELATIONS[chain[-1].kind][last]
    text = f"{ASK[kind]} {_phrase(anchor.name, [*relations, last])}?"
    return Question(text, answer, kind, [e.name for e in chain], [*relations, last])


def numeric_question(world: World, rng: random.Random, hops: int) -> Question | None:
    """How many years apart two dates of the same chain are: `hops` lookups, then a subtraction."""
    anchor = rng.choice(list(world.entities.values()))
    walked = _walk(world, rng, anchor, max(hops - 1, 1))
    if walked is None:
        return None
    chain, relations = walked
    first, last = chain[0], chain[-1]

    def event(entity: Entity, phrase: str) -> tuple[str, int]:
        if entity.kind == "person":
            return f"the birth of {phrase}", int(entity.facts["birth_year"])
        return f"the founding of {phrase}", int(entity.facts["founded"])

    (event_a, year_a), (event_b, year_b) = (
        event(first, first.name),
        event(last, _phrase(anchor.name, relations)),
    )
    high, low = max(year_a, year_b), min(year_a, year_b)
    text = f"How many years apart are {event_a} and {event_b}?"
    return Question(text, str(high - low), "number", [e.name for e in chain], relations, f"{high} - {low}")
