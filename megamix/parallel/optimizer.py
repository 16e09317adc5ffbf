"""Data-parallel gradient reduction and AdamW, with the optimizer state sharded over data parallel (ZeRO-1).

Each step:
1. partial gradients (replicated kv heads, norms under sequence parallel) are summed over TP,
   and a tied embedding's over the first and last pipeline stage;
2. gradients are averaged over the grad group (dp × cp) in buckets: reduce-scatter
   when sharded, all-reduce otherwise. An expert's weight lives only on the
   expert-parallel rank that holds the expert, and its gradient already sums the
   tokens of the whole ep group, so it is summed over ``expert_dp`` (the ranks
   holding the same experts) and divided by dp × cp all the same;
3. the global gradient norm is computed from what each rank holds (replicated
   pieces weighted by 1/replicas) and gradients are clipped;
4. AdamW updates this rank's rows of every parameter — rows [r·c, (r+1)·c) of dim 0
   with c = ⌈rows / n⌉ for the n ranks of its reduction group when sharded, all rows
   otherwise — in place;
5. when sharded, the updated rows are all-gathered, bucket by bucket.

Sharding whole rows of each parameter (rather than a flat range across
parameters) keeps every piece of optimizer state a rectangle of the global
tensor, so checkpoints reshard between any layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megamix.parallel import comm
from megamix.parallel.checkpointing import GlobalPieces
from megamix.parallel.sharding import Sharding, sharding_of, sum_partial_gradient
from megamix.parallel.state import Group, ParallelState

BUCKET_BYTES = 32 * 2**20


@dataclass
class _Slot:
    """One parameter and the rows of it this rank updates."""

    name: str
    param: torch.nn.Parameter
    sharding: Sharding
    group: Group  # the ranks its gradient is reduced over (and its state sharded over)
    rows_per_rank: int  # c: every rank's share of dim 0, padded
    start: int
    end: int
    shard: torch.Tensor  # param.data[start:end], what AdamW steps

    @property
    def row_numel(self) -> int:
        return self.param[0].numel()


class DistributedOptimizer:
    """AdamW over this rank's rows of each parameter; ``shard=True`` is ZeRO-1 (state kept for 1/dp of the rows)."""

    def __init__(self, named_parameters, parallel: ParallelState, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, shard: bool = True, bucket_bytes: int = BUCKET_BYTES):
        self.parallel = parallel
        self.shard = shard and parallel.grad.size > 1
        self.slots: list[_Slot] = []
        for name, param in named_parameters:
            sharding = sharding_of(param, parallel.tp.size)
            group = parallel.expert_dp if sharding.expert_parallel else parallel.grad
            n, rank = (group.size, group.rank) if self.shard else (1, 0)
            rows = param.shape[0]
            c = math.ceil(rows / n)
            start, end = min(rank * c, rows), min((rank + 1) * c, rows)
            self.slots.append(_Slot(name, param, sharding, group, c, start, end, param.data[start:end]))
        self.buckets = _buckets(self.slots, bucket_bytes)
        decay = [s.shard for s in self.slots if s.param.ndim >= 2]
        no_decay = [s.shard for s in self.slots if s.param.ndim < 2]
        # fused: one multi-tensor kernel per step on CPU and GPU instead of a loop over tensors
        self.adamw = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}],
                                       lr=lr, betas=betas, eps=eps, fused=True)

    @property
    def param_groups(self):
        return self.adamw.param_groups

    # -- gradients ---------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's share of the step's loss; gradients accumulate until the step."""
        loss.backward()

    def reduce_gradients(self) -> None:
        """Steps 1–2: after backward, leave each slot's averaged gradient rows in ``slot.shard.grad``."""
        for slot in self.slots:
            if slot.param.grad is None:
                slot.param.grad = torch.zeros_like(slot.param)
            if slot.sharding.partial_grads:
                sum_partial_gradient(slot.param.grad, slot.sharding, self.parallel.tp)
            if slot.sharding.stage_copies > 1:
                comm.all_reduce(slot.param.grad, self.parallel.embedding)
        for bucket in self.buckets:
            if self.shard:
                self._reduce_scatter(bucket)
            else:
                self._all_reduce(bucket)

    def _all_reduce(self, bucket: list[_Slot]) -> None:
        group = bucket[0].group
        if self.parallel.grad.size > 1:
            flat = torch.cat([s.param.grad.flatten() for s in bucket])
            comm.all_reduce(flat, group).div_(self.parallel.grad.size)
            for slot, grad in zip(bucket, flat.split([s.param.numel() for s in bucket])):
                slot.param.grad.copy_(grad.view_as(slot.param))
        for slot in bucket:
            slot.shard.grad = slot.param.grad

    def _reduce_scatter(self, bucket: list[_Slot]) -> None:
        group = bucket[0].group
        n = group.size
        flat = torch.cat([_padded_rows(s.param.grad, s.rows_per_rank * n).view(n, -1) for s in bucket], dim=1)
        mine = comm.reduce_scatter(flat.flatten(), group).div_(self.parallel.grad.size)
        offset = 0
        for slot in bucket:
            width = slot.rows_per_rank * slot.row_numel
            rows = slot.end - slot.start
            slot.shard.grad = mine[offset:offset + rows * slot.row_numel].view_as(slot.shard)
            offset += width
            slot.param.grad = None  # the full gradient is no longer needed

    def clip_grad_norm(self, max_norm: float) -> float:
        """Step 3: the global L2 norm of the gradient; scales gradients down to ``max_norm`` if above it."""
        dense, experts = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for slot in self.slots:
            grad = slot.shard.grad
            # squares summed per row in the gradient's precision, rows accumulated in fp64
            per_row = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1).double().square()
            weights = slot.sharding.row_weights(slot.param.shape[0])[slot.start:slot.end]
            (experts if slot.sharding.expert_parallel else dense).add_((per_row * weights.double()).sum())
        if self.shard:
            comm.all_reduce(dense, self.parallel.grad)
            comm.all_reduce(experts, self.parallel.expert_dp)
        total = dense + comm.all_reduce(experts, self.parallel.ep)  # each ep rank holds other experts
        comm.all_reduce(total, self.parallel.model)
        norm = math.sqrt(total.item())
        if max_norm > 0 and norm > max_norm:
            torch._foreach_mul_([s.shard.grad for s in self.slots], max_norm / (norm + 1e-6))
        return norm

    # -- update --------------------------------------------------------------------

    def step(self) -> None:
        """Steps 4–5."""
        self.adamw.step()
        if self.shard:
            for bucket in self.buckets:
                self._all_gather(bucket)

    def _all_gather(self, bucket: list[_Slot]) -> None:
        group = bucket[0].group
        n = group.size
        mine = torch.cat([_padded_rows(s.shard, s.rows_per_rank).flatten() for s in bucket])
        gathered = comm.all_gather(mine, group).view(n, -1)
        offset = 0
        for slot in bucket:
            width = slot.rows_per_rank * slot.row_numel
            rows = gathered[:, offset:offset + width].reshape(n * slot.rows_per_rank, *slot.param.shape[1:])
            slot.param.data.copy_(rows[:slot.param.shape[0]])
            offset += width

    def zero_grad(self) -> None:
        for slot in self.slots:
            slot.param.grad = None
            slot.shard.grad = None

    # -- checkpoint ------------------------------------------------------------------

    def parameter_tensors(self) -> list[tuple[str, Sharding, torch.Tensor]]:
        """(name, sharding, value) of each parameter, to save or load into: the parameters themselves."""
        return [(slot.name, slot.sharding, slot.param.data) for slot in self.slots]

    def checkpoint_state(self) -> dict:
        """Flat DCP entries: each parameter's Adam moments as pieces of the global tensor, and the step count."""
        for group in self.adamw.param_groups:  # state exists only after the first step; make it now to load into
            for shard in group["params"]:
                state = self.adamw.state[shard]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(shard),
                                 exp_avg_sq=torch.zeros_like(shard))
        entries = {}
        for slot in self.slots:
            state = self.adamw.state[slot.shard]
            for key in ("exp_avg", "exp_avg_sq"):
                entries[f"optim.{slot.name}.{key}"] = GlobalPieces(slot.sharding, state[key], row_start=slot.start)
        entries["optim.step"] = self.adamw.state[self.slots[0].shard]["step"]
        return entries

    def after_checkpoint_load(self) -> None:
        """Every shard shares the loaded step count (it was loaded into the first one)."""
        step = self.adamw.state[self.slots[0].shard]["step"]
        for slot in self.slots[1:]:
            self.adamw.state[slot.shard]["step"].copy_(step)


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with dim 0 zero-padded to ``rows``."""
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    return padded


def _buckets(slots: list[_Slot], bucket_bytes: int) -> list[list[_Slot]]:
    """Consecutive slots of the same reduction group, about ``bucket_bytes`` per bucket."""
    buckets = []
    for group in dict.fromkeys(s.group for s in slots):
        current, size = [], 0
        for slot in (s for s in slots if s.group == group):
            current.append(slot)
            size += slot.param.numel() * slot.param.element_size()
            if size >= bucket_bytes:
                buckets.append(current)
                current, size = [], 0
        buckets += [current] if current else []
    return buckets

