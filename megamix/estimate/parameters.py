"""Parameters on one rank, read from the model's own modules built on the meta device.

Building each layer kind once with a tensor-parallel group of size tp and an expert-parallel group
of size ep (no process group: meta modules never communicate) gives the exact local shapes that a
rank holds — replicated kv heads, split experts and all — without a formula to keep in sync.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from megamix.config import ModelConfig
from megamix.models import HybridModel
from megamix.nn.mlp import MLP_MATRICES
from megamix.parallel import Group, TensorParallel, sharding_of
from megamix.parallel.pipeline import STAGE_MARK


@dataclass(frozen=True)
class Tensor:
    """One local parameter: dim-0 rows × elements per row; ``expert`` when it lives on one ep rank."""

    rows: int
    row_numel: int
    expert: bool

    @property
    def numel(self) -> int:
        return self.rows * self.row_numel


@dataclass(frozen=True)
class RankParameters:
    """Local parameters of one rank by part: ``layers[kind]`` one layer of that pattern character,
    ``embedding`` the input embedding, ``head`` the final norm and LM head (the tied embedding when
    ``cfg.tie_embeddings``)."""

    layers: dict[str, tuple[Tensor, ...]]
    embedding: tuple[Tensor, ...]
    head: tuple[Tensor, ...]


def _tensors(module: torch.nn.Module, tp: int) -> tuple[Tensor, ...]:
    return tuple(Tensor(p.shape[0], math.prod(p.shape[1:]), sharding_of(p, tp).expert_parallel)
                 for p in module.parameters())


_CACHE: dict[tuple[str, int, int], RankParameters] = {}


def rank_parameters(cfg: ModelConfig, tp: int, ep: int) -> RankParameters:
    """The local parameters of a rank at tensor-parallel size ``tp`` and expert-parallel size ``ep``
    (cached: a layout search asks for the same few sizes many times)."""
    key = (repr(cfg), tp, ep)
    if key not in _CACHE:
        _CACHE[key] = _build(cfg, tp, ep)
    return _CACHE[key]


def _build(cfg: ModelConfig, tp: int, ep: int) -> RankParameters:
    kinds = "".join(dict.fromkeys(cfg.pattern.replace(STAGE_MARK, "")))
    probe = HybridModel(dataclasses.replace(cfg, pattern=kinds), device=torch.device("meta"),
                        tp=TensorParallel(Group(None, 0, tp)), ep=Group(None, 0, ep))
    layers = {kind: _tensors(layer, tp) for kind, layer in zip(kinds, probe.layers.values())}
    embedding = _tensors(probe.embed, tp)
    head = _tensors(probe.norm, tp) + (_tensors(probe.lm_head, tp) if probe.lm_head is not None else embedding)
    return RankParameters(layers, embedding, head)


def count(tensors) -> int:
    return sum(t.numel for t in tensors)


def total_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of the whole model: active counts the top-k routed experts
    of each MoE layer (plus its shared ones and router) instead of all its experts."""
    params = rank_parameters(cfg, 1, 1)
    kinds = cfg.pattern.replace(STAGE_MARK, "")
    total = sum(count(params.layers[k]) for k in kinds) + count(params.embedding) + count(params.head)
    if cfg.tie_embeddings:
        total -= count(params.embedding)
    inactive = 0
    if "E" in cfg.pattern:
        moe = cfg.moe
        per_expert = MLP_MATRICES[cfg.mlp] * cfg.hidden_size * moe.ffn_hidden_size
        inactive = cfg.pattern.count("E") * (moe.num_experts - moe.top_k) * per_expert
    return total, total - inactive
