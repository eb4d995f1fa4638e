"""The demo model's task: fill a JSON record from a sentence about a person.

    user:  Fill the record: Meet Maya, 34, a pilot living in Oslo. She speaks Greek and Hindi.
    model: {"name": "Maya", "age": 34, "city": "Oslo", "job": "pilot", "languages": ["Greek", "Hindi"]}

Exact-match answers, a fixed structure whose every slot the decoder can fill in parallel (bidirectional denoising
sees the closing brackets while it fills the names), values copied from the prompt in a different order (what
prompt lookup and a drafter can exploit), and answers of two 24-token canvases (the block loop commits one, encodes it, then denoises the next).

Seeded and deterministic: ``split("train" | "valid" | "test", n)`` always returns the same records, and the three
splits never share a prompt (the test set is held out from training by construction, and checked).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Karen", "Leo", "Maya", "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wendy", "Xavier", "Yara", "Zoe", "Aaron", "Bella", "Caleb", "Diana", "Ethan", "Fiona", "George", "Hannah", "Isaac", "Julia", "Kevin", "Laura", "Mason", "Nina", "Oscar", "Priya", "Ravi", "Sofia", "Thomas", "Ursula", "Vera", "William", "Amir", "Beatriz", "Chen", "Dmitri", "Elena", "Farah", "Gustavo", "Hiro", "Ingrid", "Jamal", "Kenji", "Lucia", "Mateo", "Nadia", "Omar", "Pedro", "Rania", "Sven", "Tomas", "Valeria", "Wei", "Yusuf", "Ana", "Boris", "Clara", "Dario", "Esther", "Felix", "Greta", "Hugo"]
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Lisbon", "Cairo", "Delhi", "Sydney", "Toronto", "Chicago", "Boston", "Seattle", "Oslo", "Vienna", "Prague", "Dublin", "Athens", "Kyoto", "Lima", "Bogota", "Nairobi", "Lagos", "Seoul", "Manila", "Jakarta", "Hanoi", "Dakar", "Quito", "Denver", "Austin", "Zurich", "Geneva", "Milan", "Naples", "Porto", "Seville", "Krakow", "Warsaw", "Riga", "Tallinn", "Helsinki", "Bergen", "Munich", "Hamburg", "Lyon", "Nice", "Montreal", "Vancouver", "Mumbai", "Chennai", "Osaka", "Busan", "Perth", "Auckland", "Havana", "Santiago", "Istanbul", "Tunis"]
JOBS = ["doctor", "teacher", "pilot", "chef", "nurse", "lawyer", "farmer", "baker", "painter", "writer", "engineer", "architect", "dentist", "plumber", "electrician", "pharmacist", "journalist", "librarian", "musician", "photographer", "designer", "programmer", "scientist", "translator", "accountant", "carpenter", "mechanic", "gardener", "firefighter", "dancer", "actor", "editor", "surgeon", "tailor", "veterinarian", "economist", "astronomer", "biologist", "chemist", "geologist"]
LANGUAGES = ["English", "French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Greek", "Polish", "Swedish", "Norwegian", "Finnish", "Turkish", "Arabic", "Hindi", "Japanese", "Korean", "Mandarin", "Swahili", "Russian"]
AGES = range(18, 80)

INSTRUCTIONS = ["Fill the record:", "Extract the person as JSON:", "JSON record for this text:"]
# {a_job} is the job with its article ("a pilot", "an editor").
TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city} who speaks {langs}.",
    "Meet {name}, {age}, {a_job} living in {city}. {name} speaks {langs}.",
    "{name} ({age}) works as {a_job} in {city} and speaks {langs}.",
    "From {city}: {name}, {job}, {age} years old, fluent in {langs}.",
    "Our {job} {name} is {age}, lives in {city} and speaks {langs}.",
    "Speaks {langs}; lives in {city}; works as {a_job}; name: {name}; age: {age}.",
    "In {city} there is {a_job} called {name}, aged {age}, who speaks {langs}.",
    "{name}, age {age}, {job}, {city}, speaks {langs}.",
    "At {age}, {name} the {job} moved to {city}. Languages: {langs}.",
    "{name} speaks {langs}, is {age} and works in {city} as {a_job}.",
]
SPLIT_SEEDS = {"train": 1, "valid": 2, "test": 3}
CANVAS_LENGTH = 24


@dataclass(frozen=True)
class Record:
    name: str
    age: int
    city: str
    job: str
    languages: tuple[str, ...]

    def json(self) -> str:
        """The exact answer: keys in a fixed order, ``json.dumps``'s default spacing."""
        return json.dumps({"name": self.name, "age": self.age, "city": self.city, "job": self.job,
                           "languages": list(self.languages)})


@dataclass(frozen=True)
class Item:
    prompt: str
    answer: str

    def to_jsonl(self) -> str:
        return json.dumps({"prompt": self.prompt, "completion": self.answer}, ensure_ascii=False)


def _language_list(languages: tuple[str, ...]) -> str:
    if len(languages) == 1:
        return languages[0]
    return ", ".join(languages[:-1]) + " and " + languages[-1]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def make_item(rng: random.Random) -> Item:
    """One random record, written as a prompt sentence, and its JSON answer."""
    record = Record(rng.choice(NAMES), rng.choice(AGES), rng.choice(CITIES), rng.choice(JOBS),
                    tuple(rng.sample(LANGUAGES, rng.choice([1, 2, 2, 3]))))
    sentence = rng.choice(TEMPLATES).format(
        name=record.name, age=record.age, city=record.city, job=record.job, a_job=_article(record.job),
        langs=_language_list(record.languages),
    )
    return Item(f"{rng.choice(INSTRUCTIONS)} {sentence}", record.json())


def split(name: str, n: int) -> list[Item]:
    """The first ``n`` items of a split; items of ``valid``/``test`` that also occur in ``train`` are skipped."""
    rng = random.Random(SPLIT_SEEDS[name])
    items: list[Item] = []
    seen: set[str] = set()
    while len(items) < n:
        item = make_item(rng)
        if item.prompt in seen or (name != "train" and _in_train(item.prompt)):
            continue
        seen.add(item.prompt)
        items.append(item)
    return items


_TRAIN_PROMPTS: set[str] = set()
TRAIN_SIZE = 60_000  # every training run draws from these; held-out splits exclude them


def _in_train(prompt: str) -> bool:
    if not _TRAIN_PROMPTS:
        _TRAIN_PROMPTS.update(item.prompt for item in split("train", TRAIN_SIZE))
    return prompt in _TRAIN_PROMPTS


def corpus() -> list[str]:
    """Text to train the tokenizer on: every word the task can produce, in sentences and records."""
    rng = random.Random(0)
    lines = [make_item(rng) for _ in range(3000)]
    words = " ".join(NAMES + CITIES + JOBS + LANGUAGES + [_article(j) for j in JOBS])
    return [words, *(item.prompt for item in lines), *(item.answer for item in lines)]
