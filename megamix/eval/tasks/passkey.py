"""Passkey retrieval (LongLoRA / Landmark attention): a number hidden in noise, asked for at the end."""

from __future__ import annotations

import random

from megamix.eval.tasks.base import Sample, Task, insert_at_depth, noise
from megamix.eval.tasks.words import number

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important info there.")


def build(rng: random.Random, units: int, depth: float | None) -> Sample:
    """The passkey sentence at a random depth (drawn first, so it does not depend on ``units``)."""
    where, key = rng.random(), number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    text = " ".join(insert_at_depth(noise(units), needle, where))
    return Sample(f"{INTRO} {text} What is the pass key? The pass key is", [key])


PASSKEY = Task("passkey", build, "exact_match", max_new_tokens=8)
