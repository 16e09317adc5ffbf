"""Pipeline parallelism: stages cut from the layer pattern, run by a 1F1B or interleaved 1F1B schedule.

``pp`` ranks × ``vpp`` virtual stages each = S stages; stage s lives on pipeline
rank ``s mod pp`` as its chunk ``s div pp`` (Megatron's interleaving). The first
stage holds the embedding, the last the final norm, the LM head and the loss.

The schedules are ``torch.distributed.pipelining``'s: our stage modules take and
return one tensor, which is exactly what its ``PipelineStage`` expects, and its
1F1B / interleaved 1F1B order the micro-batches as Megatron does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamix.errors import ConfigError
from megamix.parallel.comm import all_reduce
from megamix.parallel.sharding import set_sharding, sharding_of
from megamix.parallel.state import ParallelState

STAGE_MARK = "|"


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model one pipeline stage builds: global layer indices, embedding, head."""

    index: int
    num_stages: int
    layers: tuple[int, ...]

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def mark_tied_across_stages(param: torch.Tensor) -> None:
    """A tied embedding lives on the first and the last stage: its gradient is summed over
    both (the ``embedding`` group) and it counts once in the gradient norm."""
    set_sharding(param, dataclasses.replace(sharding_of(param), stage_copies=2))


def split_layers(pattern: str, num_stages: int, layer_costs: list[float]) -> list[list[int]]:
    """Global layer indices of each of ``num_stages`` contiguous stages.

    With ``|`` marks in the pattern the stages are exactly the marked segments, and
    their number must equal ``num_stages``. Otherwise the layers are cut where the
    most expensive stage is cheapest, by ``layer_costs`` (one per layer; the
    embedding's cost belongs in the first layer's, the head's and loss's in the
    last's, since those always share a stage). Never silently changes the layout:
    an impossible split is an error.
    """
    num_layers = len(layer_costs)
    if STAGE_MARK in pattern:
        segments = pattern.split(STAGE_MARK)
        if len(segments) != num_stages or not all(segments):
            raise ConfigError(f"model.pattern {pattern!r} has {len(segments)} stages between its '|' marks "
                              f"(empty ones included); parallel.pp × parallel.vpp = {num_stages} needs exactly that "
                              f"many non-empty segments")
        stages, start = [], 0
        for segment in segments:
            stages.append(list(range(start, start + len(segment))))
            start += len(segment)
        return stages
    if num_layers < num_stages:
        raise ConfigError(f"model.pattern has {num_layers} layers, fewer than parallel.pp × parallel.vpp = "
                          f"{num_stages} stages")
    return _min_max_partition(layer_costs, num_stages)


def _min_max_partition(costs: list[float], parts: int) -> list[list[int]]:
    """Contiguous partition of ``costs`` into ``parts`` non-empty runs minimising the largest run;
    dynamic programming over cut points."""
    n = len(costs)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[k][i]: the smallest possible largest run when the first i layers form k runs
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    stages, end = [], n
    for k in range(parts, 0, -1):
        start = cut[k][end]
        stages.append(list(range(start, end)))
        end = start
    return stages[::-1]


def stage_specs(stages: list[list[int]], parallel: ParallelState) -> list[StageSpec]:
    """The stages this pipeline rank holds: s = rank, rank + pp, rank + 2·pp, … (interleaved order)."""
    pp, rank = parallel.pp.size, parallel.pp.rank
    return [StageSpec(s, len(stages), tuple(stages[s])) for s in range(rank, len(stages), pp)]


class PipelineSchedule:
    """Runs one optimizer step's micro-batches through this rank's stage modules.

    ``loss_fn(logits, targets)`` is the mean per-token loss of one micro-batch; the
    returned loss is the mean over micro-batches, on every pipeline rank. Each :meth:`step`
    times the schedule (``elapsed``: from the first micro-batch's forward to the last one's
    backward, the optimizer step excluded) and sums the local stages' forward and backward time
    per micro-batch and the loss (``busy``, their sends and receives excluded), so :meth:`bubble`
    = 1 − busy / (the longest rank's elapsed), the idle fraction that theory puts at
    (p − 1) / (v·m + p − 1) for p pipeline ranks, v stages per rank and m micro-batches.
    """

    def __init__(self, modules: list[nn.Module], specs: list[StageSpec], parallel: ParallelState,
                 device: torch.device, micro_batches: int, loss_fn: Callable):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleInterleaved1F1B,
        )

        pp = parallel.pp.size
        if len(specs) > 1 and micro_batches % pp:
            raise ConfigError(f"the interleaved schedule needs the micro-batches per step ({micro_batches}) to be "
                              f"a multiple of parallel.pp ({pp}); change train.global_batch_size")
        self.parallel = parallel
        self.is_last = specs[-1].is_last
        self.is_first = specs[0].is_first
        self.busy = self.elapsed = 0.0
        stages = [PipelineStage(module, spec.index, spec.num_stages, device, group=parallel.pp.group)
                  for module, spec in zip(modules, specs)]
        self.sequences: list = []
        for stage in stages:
            stage.forward_one_chunk = self._timed(self._with_sequence(stage.forward_one_chunk))
            stage.backward_one_chunk = self._timed(stage.backward_one_chunk)
        loss_fn = self._timed(loss_fn)  # the schedule computes the loss outside the last stage's forward
        if len(stages) == 1:
            self.schedule = Schedule1F1B(stages[0], micro_batches, loss_fn=loss_fn)
        else:
            self.schedule = ScheduleInterleaved1F1B(stages, micro_batches, loss_fn=loss_fn)

    def _timed(self, compute: Callable) -> Callable:
        """``compute`` (a stage's forward or backward of one micro-batch) adding its wall time to ``busy``."""
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return compute(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - start
        return timed

    def _with_sequence(self, forward: Callable) -> Callable:
        """A stage's forward of micro-batch i, given that micro-batch's layout (``sequences[i]``) as the
        ``sequence`` argument of every stage module, not only the first stage's."""
        def forward_with_sequence(fwd_chunk_id: int, args, kwargs=None, *rest, **options):
            return forward(fwd_chunk_id, args, {**(kwargs or {}), "sequence": self.sequences[fwd_chunk_id]},
                           *rest, **options)
        return forward_with_sequence

    def bubble(self) -> float:
        """Idle fraction of the last step's schedule, averaged over the pipeline ranks: 1 − mean busy / span,
        the span being the longest rank's ``elapsed`` (the ranks start together; the last stage finishes
        before the first one's last backward, which its idle time must still count)."""
        busy = all_reduce(torch.tensor(self.busy, dtype=torch.float64), self.parallel.pp)
        span = all_reduce(torch.tensor(self.elapsed, dtype=torch.float64), self.parallel.pp, op=dist.ReduceOp.MAX)
        return 1.0 - busy.item() / self.parallel.pp.size / span.item()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, sequences: list) -> float:
        """One step over this rank's micro-batches: ``inputs [rank_batch, seq]`` (read by the first stage),
        ``targets [rank_batch, ...]`` (by ``loss_fn`` on the last) and each micro-batch's
        :class:`~megamix.parallel.context_parallel.SequenceLayout` (by every stage)."""
        losses: list[torch.Tensor] = []
        self.sequences = sequences
        if self.parallel.pp.size > 1:  # the ranks start the schedule together, so its span is the longest elapsed
            dist.barrier(group=self.parallel.pp.group)
        self.busy, start = 0.0, time.perf_counter()
        if self.is_first:
            self.schedule.step(inputs, target=targets if self.is_last else None, losses=losses)
        elif self.is_last:
            self.schedule.step(target=targets, losses=losses)
        else:
            self.schedule.step()
        self.elapsed = time.perf_counter() - start
        local = torch.stack(losses).mean() if losses else torch.zeros(())
        return all_reduce(local.detach().float(), self.parallel.pp).item()  # only the last stage contributes
