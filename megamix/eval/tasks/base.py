"""What a synthetic long-context task is, and how its prompts are fitted to a token budget."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from megamix.errors import ConfigError

# The "noise" haystack of passkey retrieval (LongLoRA) and RULER: sentences repeated in order.
NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]


@dataclass(frozen=True)
class Sample:
    """A prompt and the strings a correct answer contains."""

    prompt: str
    answers: list[str]


@dataclass(frozen=True)
class Task:
    """A prompt family: ``build(rng, units, depth)`` makes a sample with ``units`` of haystack (sentences,
    book entries, list words…) and, for tasks with ``depths``, the needle at relative ``depth`` ∈ [0, 1].
    ``metric`` names a function of :mod:`megamix.eval.scoring`; ``max_new_tokens`` bounds the answer."""

    name: str
    build: Callable[[random.Random, int, float | None], Sample]
    metric: str
    max_new_tokens: int
    depths: bool = False


def noise(units: int) -> list[str]:
    """``units`` sentences of the noise haystack."""
    return [NOISE[i % len(NOISE)] for i in range(units)]


def insert_at_depth(sentences: list[str], needle: str, depth: float) -> list[str]:
    """The needle placed between sentences at relative depth ``depth`` (0 first, 1 last): the sentence
    boundary at or before depth · len."""
    at = int(depth * len(sentences))
    return sentences[:at] + [needle] + sentences[at:]


def insert_randomly(rng: random.Random, sentences: list[str], needles: list[str]) -> list[str]:
    """The needles, in order, at random sentence boundaries."""
    places = sorted(rng.randint(0, len(sentences)) for _ in needles)
    out = list(sentences)
    for offset, (place, needle) in enumerate(zip(places, needles)):
        out.insert(place + offset, needle)
    return out


def fit_to_length(task: Task, count_tokens: Callable[[str], int], length: int, seed: str,
                  depth: float | None = None) -> tuple[Sample, int]:
    """The sample with the most haystack whose prompt plus ``task.max_new_tokens`` fits ``length`` tokens
    (binary search over the haystack units, RULER's method), and its prompt's token count. The sample's
    random choices come from ``seed`` alone, so the result is deterministic."""
    budget = length - task.max_new_tokens

    def build(units: int) -> tuple[Sample, int]:
        sample = task.build(random.Random(seed), units, depth)
        return sample, count_tokens(sample.prompt)

    best = build(0)
    if best[1] > budget:
        raise ConfigError(f"length {length} is too short for task {task.name}: its prompt without haystack takes "
                          f"{best[1]} tokens plus {task.max_new_tokens} for the answer")
    low, high = 0, 1
    while (candidate := build(high))[1] <= budget:
        low, best, high = high, candidate, high * 2
    while high - low > 1:  # build(low) fits, build(high) does not
        mid = (low + high) // 2
        candidate = build(mid)
        if candidate[1] <= budget:
            low, best = mid, candidate
        else:
            high = mid
    return best
