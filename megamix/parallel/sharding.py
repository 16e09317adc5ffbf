"""How a rank's local parameter maps onto the full (global) parameter: the one sharding rule.

A tensor-parallel layer keeps only part of each weight. :class:`Sharding` records
which: a list of :class:`Piece` s along one dimension, each a run of local indices
that sits at some global offset and is held by ``replicas`` tensor-parallel ranks.
Everything layout-dependent reads it:

- initialisation draws the full tensor from the seed and keeps the local pieces,
  so values never depend on the layout;
- checkpoints store every piece at its global offset, so they load under any layout;
- gradient norms weight replicated pieces by 1/replicas, counting each element once;
- ``partial_grads`` marks parameters whose gradients must be summed over the
  tensor-parallel group (replicated kv heads, norms under sequence parallel);
- ``stage_copies`` marks a tied embedding held by the first and the last pipeline
  stage, whose gradients are summed over both;
- ``expert_parallel`` marks an expert's weight: only the ``ep`` rank that holds the expert
  has it (its name carries the global expert index), so its gradient is reduced over the
  ranks holding the same experts (``expert_dp``) rather than all data-parallel ranks.

A parameter without a sharding is whole and replicated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megamix.parallel.comm import all_reduce


@dataclass(frozen=True)
class Piece:
    """Local indices [local_start, local_start + length) along the sharded dim = global [global_start, …)."""

    local_start: int
    global_start: int
    length: int
    replicas: int = 1


@dataclass(frozen=True)
class Sharding:
    global_shape: tuple[int, ...]
    dim: int
    pieces: tuple[Piece, ...]
    partial_grads: bool = False
    stage_copies: int = 1  # pipeline stages holding a copy (2 for a tied embedding split from its head)
    expert_parallel: bool = False

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's local tensor cut from the full one."""
        return torch.cat([full.narrow(self.dim, p.global_start, p.length) for p in self.pieces], dim=self.dim)

    def chunks(self, tensor: torch.Tensor, row_start: int = 0):
        """Yield (global offsets, view) for each piece inside ``tensor``.

        ``tensor`` holds local rows [row_start, row_start + len(tensor)) of dim 0: the
        whole local parameter, or the row slice a distributed optimizer keeps state for.
        """
        row_end = row_start + tensor.shape[0]
        for piece in self.pieces:
            offsets = [0] * len(self.global_shape)
            if self.dim == 0:
                lo, hi = max(row_start, piece.local_start), min(row_end, piece.local_start + piece.length)
                if lo >= hi:
                    continue
                offsets[0] = piece.global_start + lo - piece.local_start
                view = tensor.narrow(0, lo - row_start, hi - lo)
            else:  # rows are not split by tensor parallelism: local row = global row
                offsets[0] = row_start
                offsets[self.dim] = piece.global_start
                view = tensor.narrow(self.dim, piece.local_start, piece.length)
            yield tuple(offsets), view

    def row_weights(self, num_rows: int) -> torch.Tensor:
        """Weight of each local dim-0 row in a norm: 1 / (replicas of its piece × stage copies)."""
        if self.dim != 0:
            return torch.full((num_rows,), 1.0 / (self.pieces[0].replicas * self.stage_copies))
        weights = torch.empty(num_rows)
        for piece in self.pieces:
            weights[piece.local_start:piece.local_start + piece.length] = 1.0 / (piece.replicas * self.stage_copies)
        return weights


def whole(shape: torch.Size | tuple[int, ...], replicas: int = 1, partial_grads: bool = False) -> Sharding:
    """The sharding of an unsplit parameter held by ``replicas`` ranks."""
    shape = tuple(shape)
    return Sharding(shape, 0, (Piece(0, 0, shape[0] if shape else 1, replicas),), partial_grads)


def split_parts(parts: list[int], shards: list[int], rank: int, tp: int, other_dims: tuple[int, ...],
                dim: int = 0) -> Sharding:
    """Sharding of a weight whose ``dim`` concatenates logical parts, each split into equal shards.

    Part i (``parts[i]`` long) is cut into ``shards[i]`` equal shards; rank r holds
    shard ``r·shards[i] // tp`` of it, so a part with fewer shards than ranks is
    replicated on ``tp / shards[i]`` neighbouring ranks (e.g. kv heads when kv < tp).
    """
    pieces, local, global_start = [], 0, 0
    for size, n in zip(parts, shards):
        length = size // n
        index = rank * n // tp
        pieces.append(Piece(local, global_start + index * length, length, tp // n))
        local += length
        global_start += size
    shape = (*other_dims[:dim], sum(parts), *other_dims[dim:])
    return Sharding(shape, dim, tuple(pieces), partial_grads=any(p.replicas > 1 for p in pieces))


def sharding_of(param: torch.Tensor, tp_size: int = 1) -> Sharding:
    """The sharding set on ``param``; an unmarked one is whole and replicated on all ``tp_size`` TP ranks."""
    return getattr(param, "sharding", None) or whole(param.shape, replicas=tp_size)


def set_sharding(param: torch.Tensor, sharding: Sharding) -> None:
    param.sharding = sharding


def mark_expert_parallel(param: torch.Tensor, tp_size: int = 1) -> None:
    """Mark ``param`` as one expert's weight, held only by the expert-parallel rank owning the expert."""
    set_sharding(param, dataclasses.replace(sharding_of(param, tp_size), expert_parallel=True))


def materialize(module: torch.nn.Module, device: torch.device | str) -> None:
    """``module.to_empty(device)`` for a module built on the meta device, keeping the shardings
    (moving off the meta device makes new parameter objects, which drops their attributes)."""
    shardings = {name: p.sharding for name, p in module.named_parameters() if hasattr(p, "sharding")}
    module.to_empty(device=device)
    for name, param in module.named_parameters():
        if name in shardings:
            set_sharding(param, shardings[name])


def full_tensor(local: torch.Tensor, sharding: Sharding, group) -> torch.Tensor:
    """The global tensor rebuilt from every TP rank's ``local`` (for tests, export and inspection).

    Each rank adds its pieces, divided by their replica count, into a zero buffer
    of the global shape; one all-reduce over the TP group sums them.
    """
    buffer = local.new_zeros(sharding.global_shape)
    for piece in sharding.pieces:
        region = buffer.narrow(sharding.dim, piece.global_start, piece.length)
        region += local.narrow(sharding.dim, piece.local_start, piece.length) / piece.replicas
    return all_reduce(buffer, group)


def sum_partial_gradient(grad: torch.Tensor, sharding: Sharding, group) -> None:
    """Sum ``grad`` in place over the TP ranks that hold the same replicated piece.

    A wholly replicated parameter is all-reduced directly. For one whose
    replicated pieces sit among sharded ones (kv heads inside [q | k | v]), the
    replicated pieces are placed at their global offsets in a zero buffer, so
    one all-reduce sums each piece over exactly the ranks that hold it.
    """
    if len(sharding.pieces) == 1 and sharding.pieces[0].replicas == group.size:
        all_reduce(grad, group)
        return
    replicated = [p for p in sharding.pieces if p.replicas > 1]
    buffer = grad.new_zeros(sharding.global_shape)
    for p in replicated:
        buffer.narrow(sharding.dim, p.global_start, p.length).copy_(grad.narrow(sharding.dim, p.local_start, p.length))
    all_reduce(buffer, group)
    for p in replicated:
        grad.narrow(sharding.dim, p.local_start, p.length).copy_(buffer.narrow(sharding.dim, p.global_start, p.length))
