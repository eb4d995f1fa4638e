"""The demo models' tasks: fill a JSON record from a sentence about a person, or records about one to four people.

    user:  Fill the record: Meet Maya, 34, a pilot living in Oslo. She speaks Greek and Hindi.
    model: {"name": "Maya", "age": 34, "city": "Oslo", "job": "pilot", "languages": ["Greek", "Hindi"]}

    user:  Fill the records: Meet Maya, 34, ... Hindi. Hugo (51) works as a chef in Lima and speaks French.
    model: [{"name": "Maya", ...}, {"name": "Hugo", "age": 51, "city": "Lima", "job": "chef", "languages": ["French"]}]

Exact-match answers, a fixed structure whose every slot the decoder can fill in parallel (bidirectional denoising
sees the closing brackets while it fills the names), values copied from the prompt in a different order (what
prompt lookup and a drafter can exploit).

* The record task (``make_item``, ``split(name, n)``): one person, answers of ~40 tokens, two 24-token canvases.
  The task of the first embedded default, now the tests' fixture ``tests/fixtures/demo24`` (stage 1 of
  ``demo.train``).
* The long task (``make_long_item``, ``split(name, n, long=True)``): one to four people; one person gets one record
  (the README's example), several a JSON list in the order of the sentences. Answers of 32 to 168 tokens that end
  inside the first or the second 128-token canvas, leaving the EOS tail a real answer leaves. (The first version
  asked for up to six people, answers of up to 251 tokens: after 1,000 steps of training, the model was exact on 17
  of 19 held-out one- and two-person answers, 4 of 10 three- and four-person ones, and 0 of 11 five- and six-person
  ones.) The task of the embedded default model (``mlx_dgemma/default_model``, ``demo.train``'s stage 2;
  why 128 and not the released 256: see there).

``is_long(canvas_length)`` says which task a model was trained for. Seeded and deterministic: ``split("train" |
"valid" | "test", n, long)`` always returns the same items, and the three splits of a task never share a prompt
(the test set is held out from training by construction, and checked).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = [
    "Alice",
    "Bob",
    "Carol",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Iris",
    "Jack",
    "Karen",
    "Leo",
    "Maya",
    "Noah",
    "Olivia",
    "Paul",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Uma",
    "Victor",
    "Wendy",
    "Xavier",
    "Yara",
    "Zoe",
    "Aaron",
    "Bella",
    "Caleb",
    "Diana",
    "Ethan",
    "Fiona",
    "George",
    "Hannah",
    "Isaac",
    "Julia",
    "Kevin",
    "Laura",
    "Mason",
    "Nina",
    "Oscar",
    "Priya",
    "Ravi",
    "Sofia",
    "Thomas",
    "Ursula",
    "Vera",
    "William",
    "Amir",
    "Beatriz",
    "Chen",
    "Dmitri",
    "Elena",
    "Farah",
    "Gustavo",
    "Hiro",
    "Ingrid",
    "Jamal",
    "Kenji",
    "Lucia",
    "Mateo",
    "Nadia",
    "Omar",
    "Pedro",
    "Rania",
    "Sven",
    "Tomas",
    "Valeria",
    "Wei",
    "Yusuf",
    "Ana",
    "Boris",
    "Clara",
    "Dario",
    "Esther",
    "Felix",
    "Greta",
    "Hugo",
]
CITIES = [
    "Paris",
    "London",
    "Tokyo",
    "Berlin",
    "Rome",
    "Madrid",
    "Lisbon",
    "Cairo",
    "Delhi",
    "Sydney",
    "Toronto",
    "Chicago",
    "Boston",
    "Seattle",
    "Oslo",
    "Vienna",
    "Prague",
    "Dublin",
    "Athens",
    "Kyoto",
    "Lima",
    "Bogota",
    "Nairobi",
    "Lagos",
    "Seoul",
    "Manila",
    "Jakarta",
    "Hanoi",
    "Dakar",
    "Quito",
    "Denver",
    "Austin",
    "Zurich",
    "Geneva",
    "Milan",
    "Naples",
    "Porto",
    "Seville",
    "Krakow",
    "Warsaw",
    "Riga",
    "Tallinn",
    "Helsinki",
    "Bergen",
    "Munich",
    "Hamburg",
    "Lyon",
    "Nice",
    "Montreal",
    "Vancouver",
    "Mumbai",
    "Chennai",
    "Osaka",
    "Busan",
    "Perth",
    "Auckland",
    "Havana",
    "Santiago",
    "Istanbul",
    "Tunis",
]
JOBS = [
    "doctor",
    "teacher",
    "pilot",
    "chef",
    "nurse",
    "lawyer",
    "farmer",
    "baker",
    "painter",
    "writer",
    "engineer",
    "architect",
    "dentist",
    "plumber",
    "electrician",
    "pharmacist",
    "journalist",
    "librarian",
    "musician",
    "photographer",
    "designer",
    "programmer",
    "scientist",
    "translator",
    "accountant",
    "carpenter",
    "mechanic",
    "gardener",
    "firefighter",
    "dancer",
    "actor",
    "editor",
    "surgeon",
    "tailor",
    "veterinarian",
    "economist",
    "astronomer",
    "biologist",
    "chemist",
    "geologist",
]
LANGUAGES = [
    "English",
    "French",
    "Spanish",
    "German",
    "Italian",
    "Portuguese",
    "Dutch",
    "Greek",
    "Polish",
    "Swedish",
    "Norwegian",
    "Finnish",
    "Turkish",
    "Arabic",
    "Hindi",
    "Japanese",
    "Korean",
    "Mandarin",
    "Swahili",
    "Russian",
]
AGES = range(18, 80)

INSTRUCTIONS = ["Fill the record:", "Extract the person as JSON:", "JSON record for this text:"]
PLURAL_INSTRUCTIONS = ["Fill the records:", "Extract the people as JSON:", "JSON records for this text:"]
PEOPLE = range(1, 5)  # the long task: answers of ~40 (one) to ~170 tokens (four)
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
RECORD_SCHEMA = Path(__file__).with_name("record_schema.json")  # one record's JSON schema (structured output)
CANVAS_LENGTH, MAX_TOKENS = 24, 96  # the record task: answers of two canvases
LONG_CANVAS_LENGTH = 128  # the long task: half the released canvas (see demo/train.py for why)
LONG_MAX_TOKENS = (
    2 * LONG_CANVAS_LENGTH
)  # every answer (at most ~250 tokens with its end of turn) ends by the second canvas


@dataclass(frozen=True)
class Record:
    name: str
    age: int
    city: str
    job: str
    languages: tuple[str, ...]

    def json(self) -> str:
        """The exact answer: keys in a fixed order, ``json.dumps``'s default spacing."""
        return json.dumps(
            {
                "name": self.name,
                "age": self.age,
                "city": self.city,
                "job": self.job,
                "languages": list(self.languages),
            }
        )


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


def _record(rng: random.Random, name: str) -> tuple[Record, str]:
    """A random record for ``name`` and the sentence that states it."""
    record = Record(
        name,
        rng.choice(AGES),
        rng.choice(CITIES),
        rng.choice(JOBS),
        tuple(rng.sample(LANGUAGES, rng.choice([1, 2, 2, 3]))),
    )
    sentence = rng.choice(TEMPLATES).format(
        name=record.name,
        age=record.age,
        city=record.city,
        job=record.job,
        a_job=_article(record.job),
        langs=_language_list(record.languages),
    )
    return record, sentence


def make_item(rng: random.Random) -> Item:
    """The record task: one person, a sentence and its JSON record."""
    record, sentence = _record(rng, rng.choice(NAMES))
    return Item(f"{rng.choice(INSTRUCTIONS)} {sentence}", record.json())


def make_long_item(rng: random.Random) -> Item:
    """The long task: one to four people (distinct names), one sentence each; one record, or a list of them in order."""
    n = rng.choice(PEOPLE)
    if n == 1:
        return make_item(rng)
    people = [_record(rng, name) for name in rng.sample(NAMES, n)]
    sentences = " ".join(sentence for _, sentence in people)
    return Item(
        f"{rng.choice(PLURAL_INSTRUCTIONS)} {sentences}", "[" + ", ".join(r.json() for r, _ in people) + "]"
    )


def is_long(canvas_length: int) -> bool:
    """Whether a model with this canvas was trained for the long task (else the record task)."""
    return canvas_length == LONG_CANVAS_LENGTH


def max_tokens(canvas_length: int) -> int:
    """The generation length that holds every answer of the task a model with this canvas was trained for."""
    return LONG_MAX_TOKENS if is_long(canvas_length) else MAX_TOKENS


def split(name: str, n: int, long: bool = False) -> list[Item]:
    """The first ``n`` items of a split of the record task (of the long task with ``long``); items of
    ``valid``/``test`` that also occur in that task's ``train`` are skipped."""
    rng = random.Random(SPLIT_SEEDS[name])
    make = make_long_item if long else make_item
    items: list[Item] = []
    seen: set[str] = set()
    while len(items) < n:
        item = make(rng)
        if item.prompt in seen or (name != "train" and _in_train(item.prompt, long)):
            continue
        seen.add(item.prompt)
        items.append(item)
    return items


_TRAIN_PROMPTS: dict[bool, set[str]] = {}
TRAIN_SIZE = 60_000  # every training run draws from these; held-out splits exclude them


def _in_train(prompt: str, long: bool) -> bool:
    if long not in _TRAIN_PROMPTS:
        _TRAIN_PROMPTS[long] = {item.prompt for item in split("train", TRAIN_SIZE, long)}
    return prompt in _TRAIN_PROMPTS[long]


def corpus() -> list[str]:
    """Text to train the tokenizer on: every word the task can produce, in sentences and records."""
    rng = random.Random(0)
    lines = [make_item(rng) for _ in range(3000)]
    words = " ".join(NAMES + CITIES + JOBS + LANGUAGES + [_article(j) for j in JOBS])
    return [words, *(item.prompt for item in lines), *(item.answer for item in lines)]
