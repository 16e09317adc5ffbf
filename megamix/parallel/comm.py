"""Every collective megamix issues, as plain calls and as autograd functions (Megatron's f/g operators).

Tensor parallel (TP) without sequence parallel (SP), around a column → row pair:

    copy_to_tp        forward identity            backward all-reduce      (Megatron "f")
    reduce_from_tp    forward all-reduce          backward identity        (Megatron "g")

With SP the activations between the pairs are sharded along the sequence (dim 1):

    gather_sequence          forward all-gather       backward reduce-scatter
    reduce_scatter_sequence  forward reduce-scatter   backward all-gather

Context parallel (CP) gathers small per-rank pieces (recurrent states, convolution halos):

    gather_parts      forward all-gather (dim 0)  backward reduce-scatter

Expert parallel (EP) moves token rows between the ranks holding different experts:

    exchange_rows     forward all-to-all (rows split per rank)    backward the reverse all-to-all

All calls go through :func:`_issue`, which a :class:`CommRecorder` can tally.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megamix.parallel.state import Group

# ---------------------------------------------------------------------------
# Recording


@dataclass
class CommRecorder:
    """Tallies collectives: ``calls[(kind, group_size)]`` and ``bytes_sent`` per rank.

    Bytes sent are those of the bandwidth-optimal ring algorithm for a payload of
    N bytes over p ranks: all-reduce 2(p−1)/p·N, all-gather and reduce-scatter
    (p−1)/p·N of the full (gathered) tensor, all-to-all (p−1)/p·N of its input
    (exact when the rows are spread evenly over the ranks); a point-to-point
    send_recv, the N bytes this rank sends.
    """

    calls: Counter = field(default_factory=Counter)
    bytes_sent: float = 0.0

    def record(self, kind: str, group_size: int, full_bytes: int) -> None:
        self.calls[(kind, group_size)] += 1
        factor = {"all_reduce": 2 * (group_size - 1) / group_size,
                  "send_recv": 1}.get(kind, (group_size - 1) / group_size)
        self.bytes_sent += factor * full_bytes

    def kinds(self) -> Counter:
        """Number of calls per kind, group sizes merged."""
        counts: Counter = Counter()
        for (kind, _), n in self.calls.items():
            counts[kind] += n
        return counts


_recorders: list[CommRecorder] = []


@contextlib.contextmanager
def record_communication():
    """``with record_communication() as rec:`` tallies every megamix collective issued inside."""
    recorder = CommRecorder()
    _recorders.append(recorder)
    try:
        yield recorder
    finally:
        _recorders.remove(recorder)


def _issue(kind: str, group: Group, full: torch.Tensor) -> None:
    for recorder in _recorders:
        recorder.record(kind, group.size, full.numel() * full.element_size())


# ---------------------------------------------------------------------------
# Plain collectives (identity on a group of one)


def all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce; returns ``x``."""
    if group.size > 1:
        _issue("all_reduce", group, x)
        dist.all_reduce(x, op=op, group=group.group)
    return x


def all_gather(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along ``dim``."""
    if group.size == 1:
        return x
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((group.size * moved.shape[0], *moved.shape[1:]))
    _issue("all_gather", group, out)
    dist.all_gather_single(out, moved, group=group.group)
    return out.movedim(0, dim).contiguous()  # layers and pipeline sends expect dense activations


def reduce_scatter(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim`` (which the group size must divide)."""
    if group.size == 1:
        return x
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // group.size, *moved.shape[1:]))
    _issue("reduce_scatter", group, moved)
    dist.reduce_scatter_single(out, moved, group=group.group)
    return out.movedim(0, dim).contiguous()


def all_to_all(x: torch.Tensor, group: Group, send_splits: list[int] | None = None,
               recv_splits: list[int] | None = None) -> torch.Tensor:
    """Send rows [Σ_{q'<q} send_splits[q'], …) of ``x`` to rank q; return the rows received,
    ``recv_splits[q]`` of them from rank q, in rank order. Without splits, equal blocks."""
    if group.size == 1:
        return x
    out = x.new_empty((x.shape[0] if recv_splits is None else sum(recv_splits), *x.shape[1:]))
    _issue("all_to_all", group, x)
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group.group)
    return out


def total_of_shares(share: torch.Tensor, *groups: Group) -> torch.Tensor:
    """A loss summed over tokens, from this rank's ``share`` of them: the value is the sum over ``groups``
    (the whole loss, for the metrics), the gradient stays this rank's share (whose parameter gradients
    the ranks' reduction adds up)."""
    whole = share.detach().clone()
    for group in groups:
        all_reduce(whole, group)
    return share + (whole - share).detach()


# ---------------------------------------------------------------------------
# Autograd functions


def _autograd_pair(forward, backward):
    """``f(x, group)`` running ``forward`` and, for the gradient, ``backward``; identity on a group of one."""

    class Pair(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return forward(x, group)

        @staticmethod
        def backward(ctx, grad):
            return backward(grad.contiguous(), ctx.group), None

    def apply(x: torch.Tensor, group: Group) -> torch.Tensor:
        return x if group.size == 1 else Pair.apply(x, group)

    return apply


def _identity(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x.view_as(x)


def _sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    return all_reduce(x.contiguous(), group)


def _gather_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    return all_gather(x, group, dim=1)


def _reduce_scatter_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    return reduce_scatter(x, group, dim=1)


def _gather_parts(x: torch.Tensor, group: Group) -> torch.Tensor:
    return all_gather(x, group, dim=0)


def _reduce_scatter_parts(x: torch.Tensor, group: Group) -> torch.Tensor:
    return reduce_scatter(x, group, dim=0)


copy_to_tp = _autograd_pair(_identity, _sum)
reduce_from_tp = _autograd_pair(_sum, _identity)
gather_sequence = _autograd_pair(_gather_seq, _reduce_scatter_seq)
reduce_scatter_sequence = _autograd_pair(_reduce_scatter_seq, _gather_seq)
gather_parts = _autograd_pair(_gather_parts, _reduce_scatter_parts)


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, send_splits, recv_splits):
        ctx.group, ctx.splits = group, (send_splits, recv_splits)
        return all_to_all(x, group, send_splits, recv_splits)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return all_to_all(grad.contiguous(), ctx.group, recv_splits, send_splits), None, None, None


def exchange_rows(x: torch.Tensor, group: Group, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    """:func:`all_to_all` of the rows of ``x [rows, ...]``; the gradient of each received row
    goes back to the rank that sent it (the reverse all-to-all). Identity on a group of one."""
    return x if group.size == 1 else _ExchangeRows.apply(x, group, send_splits, recv_splits)


# ---------------------------------------------------------------------------
# Point-to-point ring exchange (ring attention)


def ring_exchange(x: torch.Tensor, group: Group):
    """Start sending ``x`` to rank + 1 of ``group`` and receiving rank − 1's tensor of the same shape and
    dtype, without blocking; returns ``wait()``, which blocks until the exchange is done and gives the
    received tensor. Every rank of the group must call it, in the same order as its other exchanges.
    """
    x = x.contiguous()
    received = torch.empty_like(x)
    send_to = dist.get_global_rank(group.group, (group.rank + 1) % group.size)
    receive_from = dist.get_global_rank(group.group, (group.rank - 1) % group.size)
    _issue("send_recv", group, x)
    requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, send_to, group.group),
                                       dist.P2POp(dist.irecv, received, receive_from, group.group)])

    def wait() -> torch.Tensor:
        for request in requests:
            request.wait()
        return received

    return wait
