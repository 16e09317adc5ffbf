"""A parallel layout on a cluster: the sizes of every dimension and where each group's ranks sit.

Ranks are ordered tp fastest, then cp, dp, pp (:mod:`megamix.parallel.state`), and rank r runs on
node r div procs_per_node: a group stays inside one node when its stride × size is at most the
node's processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megamix.config import Config
from megamix.errors import ConfigError
from megamix.parallel.state import check_layout


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    procs_per_node: int = 1

    def __post_init__(self):
        if self.nodes < 1 or self.procs_per_node < 1:
            raise ConfigError(f"--nodes and --procs-per-node must be >= 1, got {self.nodes}, {self.procs_per_node}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(frozen=True)
class Layout:
    """world = pp × dp × cp × tp; ``micro_batch`` samples per micro-batch, ``micro_batches`` per step
    on each data-parallel rank (global batch = dp × micro_batches × micro_batch)."""

    tp: int
    pp: int
    vpp: int
    cp: int
    ep: int
    dp: int
    sequence_parallel: bool
    zero: int
    micro_batch: int
    micro_batches: int
    recompute: bool

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def sp(self) -> bool:
        """Whether activations between the mixers are sequence-sharded over tp."""
        return self.sequence_parallel and self.tp > 1

    @property
    def grad_group(self) -> int:
        """dp × cp: the ranks over which gradients are averaged and (ZeRO-1) optimizer state is sharded."""
        return self.dp * self.cp

    def stride(self, dim: str) -> int:
        """Rank distance between neighbours along ``dim``: tp, cp, dp, pp, or the groups that run along
        cp and dp together: ``grad`` (dp × cp), ``ep`` (consecutive blocks of it) and ``expert_dp`` (the
        ranks ep apart in it, holding the same experts)."""
        if dim in ("grad", "ep"):
            return self.tp
        if dim == "expert_dp":
            return self.tp * self.ep
        order = ["tp", "cp", "dp", "pp"]
        stride = 1
        for name in order[:order.index(dim)]:
            stride *= getattr(self, name)
        return stride

    def crosses_nodes(self, dim: str, size: int, cluster: Cluster) -> bool:
        """Whether a group of ``size`` ranks along ``dim`` spans more than one node."""
        return size > 1 and self.stride(dim) * size > cluster.procs_per_node

    def describe(self) -> str:
        sp = " sp" if self.sp else ""
        vpp = f"×{self.vpp}v" if self.vpp > 1 else ""
        return (f"tp {self.tp}{sp} · pp {self.pp}{vpp} · dp {self.dp} · cp {self.cp} · ep {self.ep}; "
                f"micro-batch {self.micro_batch} × {self.micro_batches}{' · recompute' if self.recompute else ''}")


def layout_of(config: Config, world_size: int) -> Layout:
    """The layout ``config`` runs at on ``world_size`` ranks; an impossible one is an error naming why."""
    p, t = config.parallel, config.train
    if p.zero_engine != "builtin":
        raise ConfigError(f"parallel.zero_engine={p.zero_engine}: the estimate models megamix's own optimizer "
                          f"(parallel.zero 0 or 1); estimate with parallel.zero_engine=builtin parallel.zero=1 for "
                          f"a bound (DeepSpeed ZeRO-2/3 shard gradients and weights further)")
    dp = check_layout(world_size, p.tp, p.pp, p.cp, p.ep)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size × dp = {t.micro_batch_size}×{dp} on {world_size} ranks")
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    if p.vpp > 1 and micro_batches % p.pp:
        raise ConfigError(f"the interleaved schedule needs the micro-batches per step ({micro_batches}) to be a "
                          f"multiple of parallel.pp ({p.pp}); change train.global_batch_size")
    return Layout(p.tp, p.pp, p.vpp, p.cp, p.ep, dp, p.sequence_parallel, p.zero, t.micro_batch_size,
                  micro_batches, t.recompute)


def apply_layout(config: Config, layout: Layout) -> Config:
    """``config`` with the parallel and batch settings of ``layout`` (the global batch unchanged)."""
    parallel = dataclasses.replace(config.parallel, tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp,
                                   ep=layout.ep, sequence_parallel=layout.sequence_parallel, zero=layout.zero)
    train = dataclasses.replace(config.train, micro_batch_size=layout.micro_batch, recompute=layout.recompute)
    return dataclasses.replace(config, parallel=parallel, train=train)
