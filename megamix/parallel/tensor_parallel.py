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


def mark_split_rows(param: torch.Tensor, parts: list[int], tp: TensorParallel) -> None:
    """Mark ``param [Σ parts / tp, ...]`` as this rank's rows of the full ``[Σ parts, ...]``, whose dim 0
    stacks ``parts``, each split evenly over the TP ranks: rank r holds rows [r·p/tp, (r+1)·p/tp) of
    a part of p rows (per-head or per-channel parameters beside a :class:`ColumnParallelLinear`)."""
    set_sharding(param, split_parts(parts, [tp.size] * len(parts), tp.rank, tp.size, tuple(param.shape[1:])))


def mark_replicated_partial_grads(param: torch.Tensor, tp: TensorParallel) -> None:
    """Mark ``param`` as whole on every TP rank, with a gradient that is partial on each rank (from its
    heads, or its sequence shard under SP): the optimizer sums it over the TP group."""
    set_sharding(param, whole(param.shape, replicas=tp.size, partial_grads=True))


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
        mark_split_rows(self.weight, [vocab_size], tp)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return tp_output(embedded, self.tp)


# Rows of logits handled at a time by the loss: 2^18 elements (1 MiB in fp32) stay in
# the core's L2 cache between the passes over one chunk.
LOSS_CHUNK_ELEMENTS = 2**18


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = log Σ_v exp(x_v − m) − (x_target − m), m = max_v x_v, over ``logits x [rows, vocab / tp]``
    whose vocabulary is split over the TP ranks (m, the sums and the target logits are all-reduced,
    so full logits are never gathered).

    Backward: dx = (softmax(x) − onehot(target)) · grad_loss. Both passes run over
    chunks of rows so that exp(x − m) is summed, and the gradient rows written,
    while the chunk is still in cache: no full-size fp32 temporaries besides the
    gradient itself, where ``F.cross_entropy`` writes log-softmax, a zero-filled
    gradient and reads both again. Computed in at least fp32 (bf16 logits are
    upcast chunk by chunk); the gradient is returned in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, targets, tp: TensorParallel):
        rows, vocab = logits.shape
        compute = torch.promote_types(logits.dtype, torch.float32)
        max_logit = comm.all_reduce(logits.amax(dim=-1).to(compute), tp.group, op=torch.distributed.ReduceOp.MAX)
        local = targets - tp.rank * vocab
        inside = (local >= 0) & (local < vocab)
        local = local.masked_fill(~inside, 0)
        target_logit = (logits.gather(-1, local[:, None]).squeeze(-1).to(compute) - max_logit).masked_fill(~inside, 0.0)
        sum_exp = max_logit.new_empty(rows)
        chunk = max(1, LOSS_CHUNK_ELEMENTS // vocab)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            torch.sum((logits[part].to(compute) - max_logit[part, None]).exp_(), dim=-1, out=sum_exp[part])
        stacked = comm.all_reduce(torch.stack([target_logit, sum_exp]), tp.group)
        log_sum_exp = stacked[1].log()
        ctx.chunk = chunk
        ctx.save_for_backward(logits, local, inside, max_logit + log_sum_exp)
        return log_sum_exp - stacked[0]

    @staticmethod
    def backward(ctx, grad_loss):
        logits, local, inside, log_normalizer = ctx.saved_tensors
        grad = torch.empty_like(logits, dtype=log_normalizer.dtype)
        minus_grad_at_target = -(grad_loss * inside)[:, None]
        for start in range(0, logits.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            softmax = torch.sub(logits[part], log_normalizer[part, None], out=grad[part]).exp_()
            softmax.mul_(grad_loss[part, None]).scatter_add_(-1, local[part, None], minus_grad_at_target[part])
        return grad.to(logits.dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                 tp: TensorParallel = NO_TENSOR_PARALLEL) -> torch.Tensor:
    """Per-token loss ``[batch, seq]`` (fp32) from vocabulary-sharded ``logits [batch, seq, vocab / tp]``
    (see :class:`_VocabParallelCrossEntropy`)."""
    loss = _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), tp)
    return loss.view_as(targets)


def mark_sequence_parallel(module: nn.Module, tp: TensorParallel) -> None:
    """Under SP every parameter not split by TP (the norms) sees only a sequence shard,
    so its gradient is partial: mark it to be summed over the TP group."""
    if not tp.sequence_parallel:
        return
    for param in module.parameters():
        if not hasattr(param, "sharding"):
            mark_replicated_partial_grads(param, tp)

