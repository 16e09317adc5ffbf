"""Process groups of a pp × dp × cp × tp layout (Megatron-Core order: tp fastest, then cp, dp, pp).

    rank = ((pp_rank · dp + dp_rank) · cp + cp_rank) · tp + tp_rank

One :class:`ParallelState` owns every group and is passed explicitly to whatever
needs it; there are no module-level globals, so tests can build and drop layouts.
"""

from __future__ import annotations

import datetime
import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamix.errors import ConfigError


@dataclass(frozen=True)
class Group:
    """One process group as a layer sees it: the torch group (None when size is 1), this rank's index, the size."""

    group: dist.ProcessGroup | None = None
    rank: int = 0
    size: int = 1


SINGLE = Group()


@dataclass(frozen=True)
class TensorParallel:
    """What a tensor-parallel layer needs: its group and whether activations are sequence-sharded."""

    group: Group = SINGLE
    sequence_parallel: bool = False

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def rank(self) -> int:
        return self.group.rank


NO_TENSOR_PARALLEL = TensorParallel()


def check_layout(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1) -> int:
    """The data-parallel size of the layout; refuses one that does not fit ``world_size``."""
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(f"parallel.tp × parallel.pp × parallel.cp = {tp}×{pp}×{cp} = {model_parallel} does not "
                          f"divide the world size {world_size}; start a multiple of {model_parallel} processes "
                          f"(e.g. torchrun --nproc-per-node {model_parallel})")
    dp = world_size // model_parallel
    if (dp * cp) % ep:
        raise ConfigError(f"parallel.ep={ep} must divide dp × cp = {dp}×{cp} = {dp * cp}")
    return dp


@dataclass(frozen=True)
class ParallelState:
    """This rank's place in the layout and its groups.

    ``grad``: the dp × cp group over which gradients are averaged (every replica of a
    parameter shard). ``model``: tp × pp, the ranks that together hold one copy of
    the parameters (Megatron's model-parallel group; cp ranks hold the same ones).
    ``ep``: expert parallel, consecutive blocks of ``ep`` ranks of the grad group;
    ``expert_dp``: the ranks of the grad group holding the same experts.
    ``embedding``: the first and the last pipeline rank (they share a tied embedding).
    """

    world_size: int
    rank: int
    tp: Group
    cp: Group
    dp: Group
    pp: Group
    grad: Group
    model: Group
    ep: Group
    expert_dp: Group
    embedding: Group
    sequence_parallel: bool = False

    @property
    def tensor_parallel(self) -> TensorParallel:
        return TensorParallel(self.tp, self.sequence_parallel)

    @classmethod
    def single(cls) -> ParallelState:
        """The trivial layout of one process (no process group needed)."""
        return cls(1, 0, *[SINGLE] * 9)

    @classmethod
    def create(cls, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1,
               sequence_parallel: bool = False) -> ParallelState:
        """Build every group from the initialised default process group (all ranks must call this)."""
        if not dist.is_initialized():
            check_layout(1, tp, pp, cp, ep)
            return cls.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        dp = check_layout(world, tp, pp, cp, ep)
        layout = {"pp": pp, "dp": dp, "cp": cp, "tp": tp}
        # The same ranks seen with dp × cp regrouped as (expert_dp, ep).
        expert_layout = {"pp": pp, "expert_dp": dp * cp // ep, "ep": ep, "tp": tp}
        groups = {name: _group_along(layout, rank, dims) for name, dims in
                  {"tp": ["tp"], "cp": ["cp"], "dp": ["dp"], "pp": ["pp"], "grad": ["dp", "cp"],
                   "model": ["pp", "tp"]}.items()}
        groups |= {name: _group_along(expert_layout, rank, [name]) for name in ("ep", "expert_dp")}
        groups["embedding"] = _group_along(layout, rank, ["pp"], only={"pp": {0, pp - 1}})
        return cls(world, rank, sequence_parallel=sequence_parallel and tp > 1, **groups)


def _rank_of(layout: dict[str, int], coords: dict[str, int]) -> int:
    rank = 0
    for name, size in layout.items():
        rank = rank * size + coords[name]
    return rank


def _group_along(layout: dict[str, int], rank: int, dims: list[str],
                 only: dict[str, set[int]] | None = None) -> Group:
    """The group of ranks that differ from ``rank`` only along ``dims`` of ``layout``
    (restricted to the coordinates in ``only``, e.g. the first and last pipeline rank).

    ``new_group`` is collective over the whole world, so every rank creates every
    group of this kind in the same order and keeps the one that contains it.
    """
    only = only or {}
    fixed = [name for name in layout if name not in dims]
    found = SINGLE
    for fixed_values in itertools.product(*(range(layout[n]) for n in fixed)):
        ranks = sorted(_rank_of(layout, {**dict(zip(fixed, fixed_values)), **dict(zip(dims, varying))})
                       for varying in itertools.product(*(sorted(only.get(n, range(layout[n]))) for n in dims)))
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            found = Group(group, ranks.index(rank), len(ranks))
    return found


def init_distributed(device: torch.device, timeout_minutes: float = 10.0) -> tuple[int, int]:
    """Join the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, …).

    Returns (rank, world_size). ``nccl`` for CUDA devices, ``gloo`` for CPU. A single
    process without those variables starts no group at all.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun or set "
                          f"RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), world_size
