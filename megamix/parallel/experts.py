"""Expert parallelism: token rows travel to the ``ep`` rank holding their expert, and back.

ep rank r holds the experts [r·L, (r+1)·L), L = num_experts / ep. A layer sorts its
token→expert assignments by global expert (so the rows for each rank are contiguous);
:meth:`ExpertDispatch.plan` exchanges the row counts per expert (one all-to-all of
``num_experts`` integers), after which

    dispatch: rows by global expert ──all-to-all──▶ rows by (source rank, local expert)
              ──permute──▶ rows by (local expert, source rank): the groups of a grouped matmul
    combine:  the inverse permutation, then the reverse all-to-all

Both are autograd operations (the backward of one is the forward of the other). Any count
may be zero, including all of a rank's: its splits and groups are then empty, but it still
joins every collective, so no rank waits for one that skipped it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamix.parallel import comm
from megamix.parallel.state import Group


@dataclass(frozen=True)
class ExpertDispatch:
    """The routes of one forward's rows.

    send_splits, recv_splits ``[ep]``: rows this rank sends to / receives from each ep rank.
    grouping ``[received rows]``: the arrival position of each row in local-expert order.
    local_counts ``[num_experts / ep]``: rows per local expert, summed over the source ranks.
    With ep = 1 nothing moves and ``local_counts`` are the counts given to :meth:`plan`.
    """

    ep: Group
    send_splits: list[int]
    recv_splits: list[int]
    grouping: torch.Tensor | None
    local_counts: torch.Tensor

    @classmethod
    def plan(cls, counts: torch.Tensor, ep: Group) -> ExpertDispatch:
        """Exchange ``counts [num_experts]``, this rank's rows per global expert (every ep rank calls it).

        The split sizes are read on the host (a device sync under CUDA): all-to-all needs them.
        """
        if ep.size == 1:
            return cls(ep, [], [], None, counts)
        sent = counts.view(ep.size, -1)  # [rank q, local expert j of q]
        received = comm.all_to_all(sent.flatten(), ep).view(ep.size, -1)  # [source rank q, my local expert j]
        local_expert = torch.arange(received.shape[1], device=counts.device).repeat(ep.size)
        grouping = torch.argsort(local_expert.repeat_interleave(received.flatten()), stable=True)
        return cls(ep, sent.sum(1).tolist(), received.sum(1).tolist(), grouping, received.sum(0))

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """``x [rows sorted by global expert, hidden]`` → ``[received rows grouped by local expert, hidden]``."""
        if self.ep.size == 1:
            return x
        return comm.exchange_rows(x, self.ep, self.send_splits, self.recv_splits)[self.grouping]

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`dispatch`: ``y [rows grouped by local expert, ...]`` → the rows of
        this rank's ``x``, in its order."""
        if self.ep.size == 1:
            return y
        in_arrival_order = y.new_empty(y.shape).index_copy(0, self.grouping, y)
        return comm.exchange_rows(in_arrival_order, self.ep, self.recv_splits, self.send_splits)
