"""Megatron-style tensor-parallel layers: drop-ins for ``nn.Linear`` / ``nn.Embedding`` and the loss.

A column-parallel linear followed by a row-parallel one needs one all-reduce
forward (in the row layer) and one backward (in the column layer's input); under
sequence parallel these become an all-gather before the column layer and a
reduce-scatter after the row layer, with the activations in between sharded
along the sequence ``[batch, seq / tp, hidden]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamix.errors import ConfigError
from megamix.parallel import comm
from megamix.parallel.sharding import set_sharding, split_parts, whole
from megamix.parallel.state import NO_TENSOR_PARALLEL, TensorParallel


def _require_divisible(what: str, size: int, shards: int) -> None:
    if size % shards:
        raise ConfigError(f"{what} ({size}) must be divisible by its {shards} tensor-parallel shards")


def tp_input(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The full-sequence, replicated input of a column-parallel layer: all-gathered under SP."""
    return comm.gather_sequence(x, tp.group) if tp.sequence_parallel else comm.copy_to_tp(x, tp.group)


def tp_output(partial: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum the ranks' partial outputs: all-reduce, or reduce-scatter along the sequence under SP."""
    if tp.sequence_parallel:
        return comm.reduce_scatter_sequence(partial, tp.group)
    return comm.reduce_from_tp(partial, tp.group)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ with W's output rows split over the TP ranks (no bias).

    x ``[batch, seq, in]`` (``[batch, seq / tp, in]`` under SP) → y ``[batch, seq, out_local]``.
    The output concatenates logical ``parts`` (e.g. [q | k | v]); part i is cut into
    ``shards[i]`` equal pieces (default: one per rank) and a part with fewer shards
    than ranks is replicated on neighbouring ranks. ``local_parts`` gives this
    rank's width of each part.
    """

    def __init__(self, in_features: int, parts: list[int], tp: TensorParallel = NO_TENSOR_PARALLEL,
                 shards: list[int] | None = None):
        super().__init__()
        shards = shards or [tp.size] * len(parts)
        for size, n in zip(parts, shards):
            _require_divisible("a column-parallel output block", size, n)
            if tp.size % n:
                raise ConfigError(f"{n} shards of an output block cannot be spread evenly over {tp.size} ranks")
        self.tp = tp
        sharding = split_parts(parts, shards, tp.rank, tp.size, (in_features,))
        self.local_parts = [p.length for p in sharding.pieces]
        self.weight = nn.Parameter(torch.empty(sum(self.local_parts), in_features))
        set_sharding(self.weight, sharding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(x, self.weight, self.tp)


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """x Wᵀ for a weight whose rows are split over the TP ranks; also the tied LM head
    (the vocabulary-sharded embedding matrix gives logits ``[batch, seq, vocab / tp]``)."""
    return F.linear(tp_input(x, tp), weight)


class RowParallelLinear(nn.Module):
    """y = x Wᵀ with W's input columns split over the TP ranks (no bias).

    x ``[batch, seq, in / tp]`` → y ``[batch, seq, out]`` (``[batch, seq / tp, out]`` under SP).
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = NO_TENSOR_PARALLEL):
        super().__init__()
        _require_divisible("a row-parallel input dimension", in_features, tp.size)
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp.size))
        set_sharding(self.weight, split_parts([in_features], [tp.size], tp.rank, tp.size, (out_features,), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_output(F.linear(x, self.weight), self.tp)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over the TP ranks: tokens ``[batch, seq]`` → ``[batch, seq, hidden]``
    (``[batch, seq / tp, hidden]`` under SP). Each rank looks up the tokens in its vocabulary range,
    zeros the rest, and the ranks' results are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = NO_TENSOR_PARALLEL):
        super().__init__()
        _require_divisible("model.vocab_size", vocab_size, tp.size)
        self.tp = tp
        self.vocab_start = tp.rank * vocab_size // tp.size
        self.weight = nn.Parameter(torch.empty(vocab_size // tp.size, hidden_size))
        set_sharding(self.weight, split_parts([vocab_size], [tp.size], tp.rank, tp.size, (hidden_size,)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return tp_output(embedded, self.tp)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """−log softmax(logits)[target] with the vocabulary split over ranks; never gathers full logits."""

    @staticmethod
    def forward(ctx, logits, targets, tp: TensorParallel):
        logits = logits.float()
        max_logit = comm.all_reduce(logits.max(dim=-1).values, tp.group, op=torch.distributed.ReduceOp.MAX)
        shifted = logits - max_logit[..., None]
        vocab_start = tp.rank * logits.shape[-1]
        local = targets - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local[..., None]).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        stacked = comm.all_reduce(torch.stack([target_logit, sum_exp]), tp.group)
        loss = stacked[1].log() - stacked[0]
        ctx.save_for_backward(exp.div_(stacked[1][..., None]), local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.scatter_add(-1, local[..., None], -(~outside).to(softmax.dtype)[..., None])
        return grad * grad_loss[..., None], None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                 tp: TensorParallel = NO_TENSOR_PARALLEL) -> torch.Tensor:
    """Per-token loss ``[batch, seq]`` (fp32) from vocabulary-sharded ``logits [batch, seq, vocab / tp]``."""
    if tp.size == 1:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return _VocabParallelCrossEntropy.apply(logits, targets, tp)


def mark_sequence_parallel(module: nn.Module, tp: TensorParallel) -> None:
    """Under SP every parameter not split by TP (the norms) sees only a sequence shard,
    so its gradient is partial: mark it to be summed over the TP group."""
    if not tp.sequence_parallel:
        return
    for param in module.parameters():
        if not hasattr(param, "sharding"):
            set_sharding(param, whole(param.shape, replicas=tp.size, partial_grads=True))

