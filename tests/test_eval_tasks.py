"""The synthetic tasks: deterministic, fitted to their token budgets, scored as RULER scores them."""

import random

import pytest

from megamix.data import Tokenizer, ensure_builtin
from megamix.errors import ConfigError
from megamix.eval.scoring import exact_match, string_match_all
from megamix.eval.tasks import SUITES, TASKS, fit_to_length, resolve_suite
from megamix.eval.tasks.aggregation import common_words, frequent_words
from tests.conftest import BUILTIN_VOCAB


@pytest.fixture(scope="module")
def count_tokens(builtin_cache):
    tokenizer = Tokenizer.load(ensure_builtin(builtin_cache, BUILTIN_VOCAB) + ".model")
    return lambda text: len(tokenizer.encode(text))


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("length", [700, 3000])
def test_prompts_fill_their_budget_and_are_deterministic(name, length, count_tokens):
    task = TASKS[name]
    depth = 0.5 if task.depths else None
    sample, tokens = fit_to_length(task, count_tokens, length, "seed-a", depth)
    budget = length - task.max_new_tokens
    assert tokens == count_tokens(sample.prompt)
    # one more unit of haystack would not fit: a unit is a sentence, an entry or a few words
    assert budget - 120 <= tokens <= budget
    assert fit_to_length(task, count_tokens, length, "seed-a", depth) == (sample, tokens)
    assert fit_to_length(task, count_tokens, length, "seed-b", depth)[0] != sample
    assert sample.answers and all(a for a in sample.answers)


@pytest.mark.parametrize("name", ["passkey", "niah", "phonebook", "phonebook_reversed", "niah_multikey",
                                  "niah_multivalue", "niah_multiquery", "variable_tracking"])
def test_retrieval_answers_are_in_the_context(name):
    sample = TASKS[name].build(random.Random(3), 50, 0.3)
    body = sample.prompt.rsplit("?", 1)[0] if name != "variable_tracking" else sample.prompt.split("Question")[0]
    assert all(answer in body for answer in sample.answers)


def test_needle_depth_moves_the_needle():
    positions = [TASKS["niah"].build(random.Random(0), 200, d).prompt.find("magic numbers for") for d in (0, 0.5, 1)]
    assert positions[0] < positions[1] < positions[2]


def test_aggregation_answers_are_the_most_frequent_words():
    for build in (common_words, frequent_words):
        sample = build(random.Random(1), 300, None)
        listing = [w for w in sample.prompt.split("Question")[0].split() if w.isalpha() and w.islower()]
        counts = {w: listing.count(w) for w in set(listing)}
        top = sorted(counts, key=counts.get, reverse=True)[:len(sample.answers)]
        assert set(top) == set(sample.answers)
        assert min(counts[a] for a in sample.answers) > max(counts[w] for w in counts if w not in top)


def test_scoring_against_hand_made_outputs():
    assert string_match_all(" 123 and 456", ["123", "456"]) == 1.0
    assert string_match_all(" 123 only", ["123", "456"]) == 0.5
    assert string_match_all("ALPHA, beta", ["alpha", "Beta", "gamma", "delta"]) == 0.5
    assert exact_match(" 48213. Remember it.", ["48213"]) == 1.0
    assert exact_match(" 555-123-4567\nJohn", ["555-123-4567"]) == 1.0
    assert exact_match(" the key is 48213", ["48213"]) == 0.0
    assert exact_match(" 4821", ["48213"]) == 0.0
    assert exact_match("", ["48213"]) == 0.0


def test_suites_resolve_to_tasks_and_unknown_names_are_refused():
    assert resolve_suite(["ruler", "niah_multikey", "passkey"]) == [*SUITES["ruler"], "passkey"]
    assert "perplexity" in resolve_suite(["all"])
    with pytest.raises(ConfigError, match="unknown suite or task 'rulers'"):
        resolve_suite(["rulers"])


def test_a_length_too_short_for_the_prompt_is_refused(count_tokens):
    with pytest.raises(ConfigError, match="too short for task passkey"):
        fit_to_length(TASKS["passkey"], count_tokens, 40, "s")
