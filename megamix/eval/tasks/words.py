"""Deterministic word material: names, keys and pseudo-words (no downloads)."""

from __future__ import annotations

import random

FIRST_NAMES = ["James", "Mary", "Robert", "Linda", "Michael", "Susan", "David", "Karen", "Daniel", "Nancy",
               "Thomas", "Laura", "George", "Helen", "Edward", "Sarah", "Peter", "Emma", "Henry", "Alice",
               "Oscar", "Julia", "Victor", "Nora", "Samuel", "Irene", "Walter", "Clara", "Felix", "Rosa"]
SYLLABLES = ["ba", "ko", "mi", "ru", "te", "lo", "sa", "ne", "di", "fu", "ga", "pi", "zo", "ve", "ha", "ju",
             "ra", "to", "me", "ki"]


def pseudo_words(rng: random.Random, count: int, syllables: int = 3) -> list[str]:
    """``count`` distinct pronounceable words of ``syllables`` syllables (20³ = 8000 at most for 3)."""
    space = len(SYLLABLES) ** syllables
    if count > space:
        raise ValueError(f"only {space} words of {syllables} syllables exist, asked for {count}")
    words = []
    for code in rng.sample(range(space), count):
        parts = []
        for _ in range(syllables):
            code, digit = divmod(code, len(SYLLABLES))
            parts.append(SYLLABLES[digit])
        words.append("".join(parts))
    return words


def full_names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct "First Surname" names (distinct pseudo-word surnames)."""
    return [f"{rng.choice(FIRST_NAMES)} {surname.capitalize()}" for surname in pseudo_words(rng, count)]


def number(rng: random.Random, digits: int) -> str:
    """A random number of exactly ``digits`` digits."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
