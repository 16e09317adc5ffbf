"""Scores of one generated answer against its references, each in [0, 1]."""

from __future__ import annotations


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's score: the fraction of the references found in the prediction, case-insensitive."""
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def exact_match(prediction: str, references: list[str]) -> float:
    """1 when the prediction starts with the single reference (after leading whitespace), else 0: the model
    must answer with the number right away (passkey, phonebook). As LongLoRA's passkey test compares the
    first generated tokens with the answer's, what follows the answer does not count."""
    return float(prediction.lstrip().startswith(references[0]))


METRICS = {"string_match_all": string_match_all, "exact_match": exact_match}
