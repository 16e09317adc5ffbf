"""The synthetic tasks by name, and the suites that group them (``megamix eval --suite``)."""

from __future__ import annotations

from megamix.errors import ConfigError
from megamix.eval.tasks.aggregation import (
    COMMON_WORDS_EXTRACTION,
    FREQUENT_WORDS_EXTRACTION,
    VARIABLE_TRACKING,
)
from megamix.eval.tasks.base import Sample, Task, fit_to_length
from megamix.eval.tasks.needles import (
    NIAH,
    NIAH_MULTIKEY,
    NIAH_MULTIQUERY,
    NIAH_MULTIVALUE,
)
from megamix.eval.tasks.passkey import PASSKEY
from megamix.eval.tasks.phonebook import PHONEBOOK, PHONEBOOK_REVERSED

TASKS: dict[str, Task] = {t.name: t for t in (
    PASSKEY, NIAH, PHONEBOOK, PHONEBOOK_REVERSED, NIAH_MULTIKEY, NIAH_MULTIVALUE, NIAH_MULTIQUERY,
    VARIABLE_TRACKING, COMMON_WORDS_EXTRACTION, FREQUENT_WORDS_EXTRACTION)}
PERPLEXITY = "perplexity"  # not a generation task: sliding windows over a token file
SUITES: dict[str, list[str]] = {
    "ruler": ["niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words",
              "frequent_words"],
    "phonebooks": ["phonebook", "phonebook_reversed"],
}
SUITES["all"] = ["passkey", "niah", *SUITES["phonebooks"], *SUITES["ruler"], PERPLEXITY]


def resolve_suite(names: list[str]) -> list[str]:
    """Suite and task names (``ruler``, ``passkey``, …) → the task names, each once, in the given order."""
    known = [*SUITES, *TASKS, PERPLEXITY]
    tasks: list[str] = []
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown suite or task {name!r}; known: {', '.join(known)}")
        tasks += [t for t in SUITES.get(name, [name]) if t not in tasks]
    return tasks


__all__ = ["PERPLEXITY", "SUITES", "TASKS", "Sample", "Task", "fit_to_length", "resolve_suite"]
