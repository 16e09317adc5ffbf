"""What each pipeline rank holds: its layers (cut by forward FLOPs), the embedding or the head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamix.config import ModelConfig
from megamix.models import HybridModel
from megamix.parallel.pipeline import STAGE_MARK, split_layers


@dataclass(frozen=True)
class RankStages:
    """Pipeline rank ``rank`` of ``pp``: the pattern characters of each of its ``vpp`` stages (chunks),
    and whether it holds the embedding (first stage) and the head (last stage)."""

    rank: int
    chunks: tuple[str, ...]
    first: bool
    last: bool

    @property
    def kinds(self) -> str:
        return "".join(self.chunks)


_FLOPS: dict[tuple[str, int], list[int]] = {}


def layer_forward_flops(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Forward FLOPs per token of each layer, from the layers' own ``flops_per_token`` (meta model; cached)."""
    key = (repr(cfg), seq_len)
    if key not in _FLOPS:
        model = HybridModel(cfg, device=torch.device("meta"))
        _FLOPS[key] = [layer.flops_per_token(seq_len) for layer in model.layers.values()]
    return _FLOPS[key]


def pipeline_ranks(cfg: ModelConfig, seq_len: int, pp: int, vpp: int) -> list[RankStages]:
    """Every pipeline rank's stages. The trainer cuts by costs measured on the device at start-up;
    the planner by forward FLOPs, the LM head's added to the last layer (``|`` marks are obeyed)."""
    costs = [float(f) for f in layer_forward_flops(cfg, seq_len)]
    costs[-1] += 2 * cfg.hidden_size * cfg.vocab_size
    kinds = cfg.pattern.replace(STAGE_MARK, "")
    split = split_layers(cfg.pattern, pp * vpp, costs)
    ranks = []
    for rank in range(pp):
        stages = range(rank, pp * vpp, pp)
        ranks.append(RankStages(rank, tuple("".join(kinds[i] for i in split[s]) for s in stages),
                                first=rank == 0, last=rank == pp - 1))
    return ranks
