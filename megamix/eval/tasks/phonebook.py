"""Phonebook lookup ("An Empirical Study of Mamba-based Language Models"): "Name: 555-xxx-xxxx" lines.

``phonebook``: the book, then the question; ``phonebook_reversed``: the question first, then the book, so
the model must know what to keep while it reads. Exact match on the number.
"""

from __future__ import annotations

import random

from megamix.eval.tasks.base import Sample, Task
from megamix.eval.tasks.words import full_names, number

INSTRUCTION = "Memorize the phone numbers in the phonebook below."


def _book(rng: random.Random, units: int) -> tuple[str, str, str]:
    """(the book text, the asked name, its number); at least one entry."""
    names = full_names(rng, units + 1)
    numbers = [f"555-{number(rng, 3)}-{number(rng, 4)}" for _ in names]
    asked = rng.randrange(len(names))
    return "\n".join(f"{n}: {p}" for n, p in zip(names, numbers)), names[asked], numbers[asked]


def standard(rng: random.Random, units: int, depth: float | None) -> Sample:
    book, name, phone = _book(rng, units)
    return Sample(f"{INSTRUCTION}\n{book}\nWhat is the phone number of {name}? Answer: {name}:", [phone])


def reversed_(rng: random.Random, units: int, depth: float | None) -> Sample:
    book, name, phone = _book(rng, units)
    return Sample(f"{INSTRUCTION} You will be asked for the phone number of {name}.\n{book}\n"
                  f"The phone number of {name}? Answer: {name}:", [phone])


PHONEBOOK = Task("phonebook", standard, "exact_match", max_new_tokens=12)
PHONEBOOK_REVERSED = Task("phonebook_reversed", reversed_, "exact_match", max_new_tokens=12)
