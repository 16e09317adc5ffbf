"""Needle-in-a-haystack and RULER's needle variants: "The special magic number for KEY is: VALUE."

- ``niah``: one needle at a given depth (the grid of lengths × depths, plotted as a heatmap);
- ``niah_multikey``: one needle among distractor needles with other keys;
- ``niah_multivalue``: several needles with the same key, all values asked for;
- ``niah_multiquery``: several needles, several keys asked for at once.
All scored by RULER's string_match_all (the fraction of the expected values in the answer).
"""

from __future__ import annotations

import random

from megamix.eval.tasks.base import (
    Sample,
    Task,
    insert_at_depth,
    insert_randomly,
    noise,
)
from megamix.eval.tasks.words import number, pseudo_words

NEEDLES = 4  # needles in the multi-key / multi-value / multi-query variants (RULER's default)


def needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def question(keys: list[str], several_values: bool = False) -> str:
    subject = "all the special magic numbers" if several_values else "the special magic number"
    asked = ", ".join(keys)
    return (f"What are {subject} for {asked} mentioned in the provided text? "
            f"The special magic numbers for {asked} mentioned in the provided text are")


def prompt(sentences: list[str], query: str) -> str:
    return ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            f"I will quiz you about the numbers afterwards. {' '.join(sentences)} {query}")


def single(rng: random.Random, units: int, depth: float | None) -> Sample:
    key, value = pseudo_words(rng, 1)[0], number(rng, 7)
    return Sample(prompt(insert_at_depth(noise(units), needle(key, value), depth), question([key])), [value])


def multikey(rng: random.Random, units: int, depth: float | None) -> Sample:
    keys, values = pseudo_words(rng, NEEDLES), [number(rng, 7) for _ in range(NEEDLES)]
    sentences = insert_randomly(rng, noise(units), [needle(k, v) for k, v in zip(keys, values)])
    return Sample(prompt(sentences, question(keys[:1])), values[:1])


def multivalue(rng: random.Random, units: int, depth: float | None) -> Sample:
    key, values = pseudo_words(rng, 1)[0], [number(rng, 7) for _ in range(NEEDLES)]
    sentences = insert_randomly(rng, noise(units), [needle(key, v) for v in values])
    return Sample(prompt(sentences, question([key], several_values=True)), values)


def multiquery(rng: random.Random, units: int, depth: float | None) -> Sample:
    keys, values = pseudo_words(rng, NEEDLES), [number(rng, 7) for _ in range(NEEDLES)]
    sentences = insert_randomly(rng, noise(units), [needle(k, v) for k, v in zip(keys, values)])
    return Sample(prompt(sentences, question(keys)), values)


NIAH = Task("niah", single, "string_match_all", max_new_tokens=16, depths=True)
NIAH_MULTIKEY = Task("niah_multikey", multikey, "string_match_all", max_new_tokens=16)
NIAH_MULTIVALUE = Task("niah_multivalue", multivalue, "string_match_all", max_new_tokens=48)
NIAH_MULTIQUERY = Task("niah_multiquery", multiquery, "string_match_all", max_new_tokens=48)
