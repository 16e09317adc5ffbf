"""RULER's variable tracking and its two aggregation tasks, common and frequent words extraction."""

from __future__ import annotations

import random
from itertools import pairwise

from megamix.eval.tasks.base import Sample, Task, insert_randomly, noise
from megamix.eval.tasks.words import number, pseudo_words

HOPS = 4  # variable tracking: VAR X1 = value, then 4 assignments VAR Xi+1 = VAR Xi
COMMON_WORDS, COMMON_REPEATS, RARE_REPEATS = 10, 30, 3  # RULER's cwe: 10 words ×30 among words ×3
FREQUENT_WORDS, ZIPF_ALPHA = 3, 2.0  # RULER's fwe: top 3 of a Zipf(α = 2) sample


def variable_tracking(rng: random.Random, units: int, depth: float | None) -> Sample:
    """A chain VAR A = 12345, VAR B = VAR A, … in noise; every variable holding the value is the answer."""
    names = [w.upper() for w in pseudo_words(rng, HOPS + 1)]
    value = number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
    text = " ".join(insert_randomly(rng, noise(units), chain))
    return Sample(f"Memorize and track the chain(s) of variable assignment hidden in the following text. {text} "
                  f"Question: Find all variables that are assigned the value {value} in the text above. "
                  f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
                  f"variables are assigned the value {value}, they are:", names)


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))


def common_words(rng: random.Random, units: int, depth: float | None) -> Sample:
    """A numbered list: 10 words up to 30 times each and ``units`` other words 3 times each, shuffled.
    Short contexts cannot hold 300 common entries: the common words then repeat 4 + units/10 times."""
    words = pseudo_words(rng, COMMON_WORDS + units)
    repeats = min(COMMON_REPEATS, RARE_REPEATS + 1 + units // COMMON_WORDS)
    listing = words[:COMMON_WORDS] * repeats + words[COMMON_WORDS:] * RARE_REPEATS
    rng.shuffle(listing)
    return Sample(f"Below is a numbered list of words. In these words, some appear more often than others. "
                  f"Memorize the ones that appear most often. {_numbered(listing)} Question: What are the "
                  f"{COMMON_WORDS} most common words in the above list? Answer: The top {COMMON_WORDS} words "
                  f"that appear most often in the list are:", words[:COMMON_WORDS])


def frequent_words(rng: random.Random, units: int, depth: float | None) -> Sample:
    """``units`` coded words, word i of the vocabulary count ∝ 1/iᵅ (Zipf), shuffled, separated by dots."""
    vocabulary = pseudo_words(rng, max(FREQUENT_WORDS + 1, units // 4))
    weights = [1 / i**ZIPF_ALPHA for i in range(1, len(vocabulary) + 1)]
    # the top words get strictly more copies than any later one (ranks never tie), at least 1 each
    counts = [max(1, round(units * w / sum(weights))) + (FREQUENT_WORDS - i if i < FREQUENT_WORDS else 0)
              for i, w in enumerate(weights)]
    coded = [w for w, c in zip(vocabulary, counts) for _ in range(c)]
    rng.shuffle(coded)
    return Sample(f"Read the following coded text and track the frequency of each coded word. Find the three "
                  f"most frequently appeared coded words. {' .... '.join(coded)} Question: Do not provide any "
                  f"explanation. Please ignore the dots '....'. What are the three most frequently appeared "
                  f"words in the above coded text? Answer: According to the coded text above, the three most "
                  f"frequently appeared words are:", vocabulary[:FREQUENT_WORDS])


VARIABLE_TRACKING = Task("variable_tracking", variable_tracking, "string_match_all", max_new_tokens=32)
COMMON_WORDS_EXTRACTION = Task("common_words", common_words, "string_match_all", max_new_tokens=96)
FREQUENT_WORDS_EXTRACTION = Task("frequent_words", frequent_words, "string_match_all", max_new_tokens=32)
