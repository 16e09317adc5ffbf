"""Memory of one pipeline rank (every rank of it: tp, cp and dp ranks hold the same amounts).

    weights      4 B per local parameter (fp32 master weights; bf16 runs autocast over them)
    grads        4 B per local parameter: the full local gradient exists from the first backward
                 until the ZeRO-1 reduce-scatter frees it
    casts        bf16 only: autocast's 2 B copy of every weight, saved for the backward
    optimizer    AdamW's two fp32 moments over the rank's rows of each parameter: ⌈rows / n⌉ rows
                 with n = dp × cp (experts: dp × cp / ep) under ZeRO-1, all rows without
    activations  one micro-batch's saved tensors (:mod:`megamix.estimate.activations`) × the micro-batches
                 in flight: 1 without pipeline; pp − r on rank r under 1F1B; under interleaving
                 (vpp − 1)·pp + 2(pp − r − 1) + 1 chunks of 1/vpp of the rank's layers (torch's
                 schedule's warm-up), at most all of them. With recompute each layer keeps its input,
                 and one layer's full activations come back during its backward
    transient    the largest short-lived buffer on top: the loss's fp32 logit gradient (last stage),
                 or ZeRO-1's flattened gradient bucket
    outputs      pipeline only, last stage: torch's schedule keeps every micro-batch's logits for its
                 merged output (until the next step) and concatenates them at the end of the step, so the
                 peak is the larger of (activations + transient + all logits) and twice all logits
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamix.config import Config
from megamix.parallel.optimizer import BUCKET_BYTES
from megamix.estimate.activations import (
    MicroBatchShape,
    embedding_bytes,
    head_bytes,
    layer_bytes,
    recompute_bytes,
)
from megamix.estimate.layout import Layout
from megamix.estimate.parameters import RankParameters, Tensor, rank_parameters
from megamix.estimate.stages import RankStages


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one rank of pipeline rank ``rank``: ``activations_by_kind`` one micro-batch's per pattern
    character (all layers of that kind on the rank, as if without recompute), ``per_micro_batch`` what a
    micro-batch keeps (with recompute: the layer inputs), ``in_flight`` how many micro-batches are kept."""

    rank: int
    parameters: int
    weights: float
    grads: float
    casts: float
    optimizer: float
    activations_by_kind: dict[str, float]
    per_micro_batch: float  # kept between a micro-batch's forward and its backward
    in_flight: float
    recomputed: float  # with recompute: one layer's activations, rebuilt during its backward
    transient: float
    outputs: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.casts + self.optimizer

    @property
    def activations(self) -> float:
        return self.per_micro_batch * self.in_flight + self.recomputed

    @property
    def peak(self) -> float:
        return self.static + max(self.activations + self.transient + self.outputs, 2 * self.outputs)


def rank_tensors(params: RankParameters, stages: RankStages, tied: bool) -> list[Tensor]:
    """The local parameters of a pipeline rank's stages."""
    tensors = [t for kind in stages.kinds for t in params.layers[kind]]
    if stages.first:
        tensors += params.embedding
    if stages.last:  # with tied embeddings and one stage, the head's matrix is the embedding already counted
        tensors += params.head[:len(params.head) - len(params.embedding)] if tied and stages.first else params.head
    return tensors


def optimizer_bytes(tensors: list[Tensor], layout: Layout) -> float:
    """AdamW moments of this rank's rows (ZeRO-1 as :class:`~megamix.parallel.DistributedOptimizer` shards)."""
    total = 0
    for t in tensors:
        n = 1
        if layout.zero == 1 and layout.grad_group > 1:
            n = layout.grad_group // layout.ep if t.expert else layout.grad_group
        total += 8 * math.ceil(t.rows / n) * t.row_numel
    return total


def in_flight(layout: Layout, rank: int) -> float:
    """Micro-batches of the whole rank's activations kept at once (a fraction under interleaving)."""
    pp, vpp, m = layout.pp, layout.vpp, layout.micro_batches
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - rank, m))
    return min((vpp - 1) * pp + 2 * (pp - rank - 1) + 1, m * vpp) / vpp


def rank_memory(config: Config, layout: Layout, stages: RankStages) -> RankMemory:
    """The memory of every rank of pipeline rank ``stages.rank`` (module docstring)."""
    c = config.model
    bf16 = config.train.precision == "bf16"
    shape = MicroBatchShape(layout.micro_batch, config.data.seq_len // layout.cp, layout.tp, layout.sp,
                            2 if bf16 else 4, layout.ep, layout.cp)
    tensors = rank_tensors(rank_parameters(c, layout.tp, layout.ep), stages, c.tie_embeddings)
    numel = sum(t.numel for t in tensors)
    by_kind = {kind: stages.kinds.count(kind) * layer_bytes(kind, c, shape) for kind in dict.fromkeys(stages.kinds)}
    if layout.recompute:
        kept = len(stages.kinds) * recompute_bytes(c, shape)
        working = max(layer_bytes(kind, c, shape) for kind in stages.kinds)
    else:
        kept, working = sum(by_kind.values()), 0.0
    if stages.first:
        kept += embedding_bytes(c, shape)
    if stages.last:
        kept += head_bytes(c, shape)
    logits = shape.tokens * (c.vocab_size // layout.tp) * shape.dtype_bytes
    logit_grad = shape.tokens * (c.vocab_size // layout.tp) * 4 + (logits if bf16 else 0)
    outputs = layout.micro_batches * logits if stages.last and layout.pp > 1 else 0
    bucket = min(BUCKET_BYTES, 4 * numel) if layout.zero == 1 and layout.grad_group > 1 else 0
    transient = max(logit_grad if stages.last else 0, bucket)
    return RankMemory(stages.rank, numel, 4 * numel, 4 * numel, 2 * numel if bf16 else 0,
                      optimizer_bytes(tensors, layout), by_kind, kept, in_flight(layout, stages.rank), working,
                      transient, outputs)
