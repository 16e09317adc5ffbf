"""Cutting a layer pattern into pipeline stages, and the layer costs that guide it (one process)."""

import pytest
import torch

from megamix.config import load_config
from megamix.errors import ConfigError
from megamix.parallel.pipeline import split_layers
from megamix.parallel.state import SINGLE
from megamix.train.stage_costs import measured_layer_costs


def test_equal_costs_split_evenly():
    assert split_layers("*-*-", 2, [1, 1, 1, 1]) == [[0, 1], [2, 3]]


def test_costs_move_the_cut():
    # an expensive layer gets a stage of its own; the head's cost (in the last layer's) lightens the last stage
    assert split_layers("*---", 2, [6, 1, 1, 1]) == [[0], [1, 2, 3]]
    assert split_layers("----", 2, [1, 1, 1, 3]) == [[0, 1, 2], [3]]


def test_uneven_layer_counts_are_balanced_not_changed():
    stages = split_layers("*-*-*-*", 2, [1] * 7)
    assert sorted(i for stage in stages for i in stage) == list(range(7))
    assert [len(s) for s in stages] in ([3, 4], [4, 3])


def test_marks_define_the_stages():
    assert split_layers("*-|*-*|-", 3, [1] * 6) == [[0, 1], [2, 3, 4], [5]]


@pytest.mark.parametrize("pattern, stages, message", [
    ("*-|*-", 3, "has 2 stages between its '|' marks"),
    ("*-||*-", 3, "empty ones included"),
    ("*-", 4, "has 2 layers, fewer than parallel.pp × parallel.vpp = 4 stages"),
])
def test_impossible_splits_are_refused(pattern, stages, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("×", "×")):
        split_layers(pattern, stages, [1] * len(pattern.replace("|", "")))


def test_measured_costs_time_each_kind_once_and_add_embedding_and_head():
    cfg = load_config(None, ["model.pattern=*-*-*-", "model.hidden_size=64", "model.vocab_size=512"]).model
    costs = measured_layer_costs(cfg, 2, 16, torch.device("cpu"), SINGLE)
    assert len(costs) == 6 and all(c > 0 for c in costs)
    assert costs[1] == costs[3] and costs[2] == costs[4]  # one timing per kind
    assert costs[0] > costs[2] and costs[5] > costs[3]  # + embedding first, + head and loss last
