"""A small English-like corpus made here, so that unit tests need no corpus package.

Documents are built from a seeded grammar of short clauses; the text is plain, varied enough for a tokenizer
and a tiny model, and has enough documents for the 70 / 15 / 15 document split to give every split sentences.
``fixture_distribution()`` writes it once per test session and returns its ``file:`` name;
``fixture_distribution(seed=1)`` is a second, different corpus of the same kind (a transfer target).
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
import tempfile

SUBJECTS = ["The river", "A small company", "The old library", "Our committee", "The new model", "A young teacher",
            "The city council", "Every morning the baker", "The research group", "A travelling musician", "The museum",
            "The northern railway", "A quiet village", "The football club", "The weather station"]
VERBS = ["opened", "described", "studied", "announced", "changed", "followed", "measured", "painted", "visited",
         "repaired", "recorded", "planned", "protected", "built", "reported"]
OBJECTS = ["a bridge across the valley", "the results of the survey", "several new buildings", "the history of the region",
           "a long report about prices", "the garden behind the station", "a collection of old maps", "the first winter festival",
           "the plans for a school", "a record number of visitors", "the damage after the storm", "two hundred trees"]
TAILS = ["in 1998", "last year", "after a long debate", "during the summer", "with great care", "because the roads were closed",
         "for the first time", "before the elections", "in the early morning", "despite the heavy rain", "without any help"]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
    if rng.random() < 0.4:
        s += f", and {rng.choice(SUBJECTS).lower()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    return s + "."


def fixture_text(documents: int = 90, sentences: int = 14, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(_sentence(rng) for _ in range(sentences)) for _ in range(documents)) + "\n"


@lru_cache(maxsize=None)
def fixture_distribution(seed: int = 0) -> str:
    """``file:PATH`` of the fixture corpus drawn with ``seed``, written once per process."""
    folder = Path(tempfile.mkdtemp(prefix="jtc-fixture-"))
    path = folder / ("fixture.txt" if seed == 0 else f"fixture-{seed}.txt")
    path.write_text(fixture_text(seed=seed), encoding="utf-8")
    return f"file:{path}"
