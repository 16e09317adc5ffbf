"""Cutting a layer pattern into pipeline stages (no processes needed)."""

import pytest

from megamix.errors import ConfigError
from megamix.parallel.pipeline import split_layers


def test_equal_costs_split_evenly():
    assert split_layers("*-*-", 2, [1, 1, 1, 1], head_cost=0) == [[0, 1], [2, 3]]


def test_costs_move_the_cut():
    # an expensive layer gets a stage of its own; the head's cost lightens the last stage
    assert split_layers("*---", 2, [6, 1, 1, 1], head_cost=0) == [[0], [1, 2, 3]]
    assert split_layers("----", 2, [1, 1, 1, 1], head_cost=2) == [[0, 1, 2], [3]]


def test_uneven_layer_counts_are_balanced_not_changed():
    stages = split_layers("*-*-*-*", 2, [1] * 7, head_cost=0)
    assert sorted(i for stage in stages for i in stage) == list(range(7))
    assert [len(s) for s in stages] in ([3, 4], [4, 3])


def test_marks_define_the_stages():
    assert split_layers("*-|*-*|-", 3, [1] * 6, head_cost=0) == [[0, 1], [2, 3, 4], [5]]


@pytest.mark.parametrize("pattern, stages, message", [
    ("*-|*-", 3, "has 2 stages between its '|' marks"),
    ("*-||*-", 3, "empty ones included"),
    ("*-", 4, "has 2 layers, fewer than parallel.pp × parallel.vpp = 4 stages"),
])
def test_impossible_splits_are_refused(pattern, stages, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("×", "×")):
        split_layers(pattern, stages, [1] * len(pattern.replace("|", "")), head_cost=0)
