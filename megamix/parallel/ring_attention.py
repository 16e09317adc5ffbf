"""Softmax attention over a sequence split across the context-parallel ranks: ring attention, or one
all-gather of K/V; packed documents masked.

Each cp rank holds two chunks of every sample (:mod:`megamix.parallel.context_parallel`). Query i sees
the keys j ≤ i of its own document:

    o_i = Σ_j exp(s_ij − lse_i) v_j,    s_ij = q_i·k_j / √head_dim,    lse_i = log Σ_j exp(s_ij)

Split the keys into blocks (the chunks): a fused kernel gives each block's (o_i^b, lse_i^b) over its
keys alone, and the blocks merge exactly (online softmax), accumulated in fp32:

    lse_i = log Σ_b exp(lse_i^b),    o_i = Σ_b exp(lse_i^b − lse_i) o_i^b

Ring attention (default): the K/V of every rank travel once around the cp ring; at each step a rank
sends the block in hand on to rank + 1 while it computes with it. ``gather_kv``: one all-gather of K/V
(Megatron-Core's ``all_gather`` cp_comm_type), fewer and larger messages, the whole sequence's K/V in
memory during the layer. Either way every rank receives the K/V of the whole sequence: communication
grows with the sequence length, where the linear mixers exchange only fixed-size states.

Backward (flash-attention style, from the saved o and lse): with the global lse each block's kernel
gives its exact share of the gradients, P_ij = exp(s_ij − lse_i), D_i = Σ_d do_id o_id,
dv_j = Σ_i P_ij do_i, ds_ij = P_ij (do_i·v_j − D_i), dq_i = Σ_j ds_ij k_j / √d, dk_j = Σ_i ds_ij q_i / √d.
The ring passes K/V around again with their dK/dV accumulators, which reach their owner one step after
the last block; the all-gather variant gathers K/V again and reduce-scatters dK/dV. dQ stays local.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megamix.parallel.comm import all_gather, reduce_scatter, ring_exchange
from megamix.parallel.context_parallel import SequenceLayout
from megamix.parallel.state import Group


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout,
                      gather_kv: bool = False) -> torch.Tensor:
    """q [batch, local_seq, heads, head_dim], k/v [batch, local_seq, kv_heads, head_dim] (this rank's tokens,
    in layout order) -> [batch, local_seq, heads, head_dim]. Query at sample position p in document d attends
    to the keys at positions <= p of document d (all earlier positions when layout.documents is None); softmax
    scale 1/sqrt(head_dim); GQA: query head h reads kv head h // (heads/kv_heads).

    Ring attention by default; ``gather_kv``: one all-gather of K/V instead. A group of one communicates
    nothing. Blocks run on torch's fused kernels: the CPU flash-attention kernel, on CUDA the memory-efficient
    one (fp16, bf16, fp32)."""
    return _ContextAttention.apply(q, k, v, layout, gather_kv)


# ---------------------------------------------------------------------------
# Which keys of a block the queries see


@dataclass(frozen=True)
class BlockMask:
    """What the queries of one chunk see of the keys of another: every key (no field set), the causal
    triangle (``causal``: a diagonal block inside one document), or ``visible [batch, q, k]`` (bool),
    where documents cut the block."""

    causal: bool = False
    visible: torch.Tensor | None = None


class BlockPlan:
    """The :class:`BlockMask` of every (query chunk, key chunk) pair of a layout, on ``device``."""

    def __init__(self, layout: SequenceLayout, device: torch.device):
        self.layout = layout
        # The chunks every cp rank holds, in its local order.
        self.source_chunks = [layout.chunks_of(rank) for rank in range(layout.group.size)]
        self.documents = None if layout.documents is None else layout.documents.to(device)
        if self.documents is not None:
            # First and last document of each chunk [chunk][batch], fetched once: deciding each pair
            # from device tensors would synchronise the device every time.
            step = layout.chunk_len
            self.first = self.documents[:, ::step].T.tolist()
            self.last = self.documents[:, step - 1::step].T.tolist()

    def mask(self, q_chunk: int, k_chunk: int) -> BlockMask | None:
        """The mask of global chunks (q_chunk, k_chunk), or None when no query sees any of the keys."""
        if k_chunk > q_chunk:
            return None
        diagonal = q_chunk == k_chunk
        # Documents never decrease along a row: one document covers the whole block when the first key
        # and the last query share it; the chunks share none when the last key's ends before the first query.
        if self.documents is None or self.first[k_chunk] == self.last[q_chunk]:
            return BlockMask(causal=diagonal)
        if not diagonal and all(k != q for k, q in zip(self.last[k_chunk], self.first[q_chunk])):
            return None
        queries = self.documents[:, self.layout.chunk_span(q_chunk)]
        keys = self.documents[:, self.layout.chunk_span(k_chunk)]
        visible = queries[:, :, None] == keys[:, None, :]
        return BlockMask(visible=visible.tril() if diagonal else visible)

    def pairs(self, source: int) -> Iterator[tuple[slice, slice, BlockMask]]:
        """(this rank's query rows, cp rank ``source``'s key rows, mask) of every block in which some
        query sees some key; rows index the local ``[.., local_seq, ..]`` tensors of either rank."""
        length = self.layout.chunk_len
        for i, q_chunk in enumerate(self.layout.chunks):
            for j, k_chunk in enumerate(self.source_chunks[source]):
                mask = self.mask(q_chunk, k_chunk)
                if mask is not None:
                    yield slice(i * length, (i + 1) * length), slice(j * length, (j + 1) * length), mask


# ---------------------------------------------------------------------------
# One block: the fused kernels (``[batch, heads, seq, head_dim]``)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, kv_heads, seq, d] → [batch, heads, seq, d], kv head h // (heads / kv_heads) for query head h."""
    batch, kv_heads, seq, dim = x.shape
    if kv_heads == heads:
        return x
    return x[:, :, None].expand(batch, kv_heads, heads // kv_heads, seq, dim).reshape(batch, heads, seq, dim)


def _sum_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of :func:`_repeat_kv`: [batch, heads, seq, d] → [batch, kv_heads, seq, d]."""
    return grad if grad.shape[1] == kv_heads else grad.unflatten(1, (kv_heads, -1)).sum(2)


def _additive_bias(visible: torch.Tensor, dtype: torch.dtype, heads: int) -> torch.Tensor:
    """visible [batch, q, k] → [batch, heads, q, k] of 0 (visible) and −inf, heads broadcast. Rows start
    8-element aligned, as SDPA pads the bias for the memory-efficient CUDA kernel."""
    batch, rows, cols = visible.shape
    bias = torch.full((batch, 1, rows, math.ceil(cols / 8) * 8), -math.inf, dtype=dtype, device=visible.device)
    bias = bias[..., :cols].masked_fill(visible[:, None], 0)
    return bias.expand(batch, heads, rows, cols)


def _block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [batch, heads, M, d], k/v [batch, kv_heads, N, d] → o [batch, heads, M, d] (q's dtype) and
    lse [batch, heads, M] (fp32, fp64 for fp64) of softmax(scale·q kᵀ + mask) over this block's keys.
    A query that sees none of them gets o = 0, lse = −inf: nothing in the merge (the CPU kernel
    returns lse = 0 there)."""
    heads = q.shape[1]
    k, v = _repeat_kv(k, heads), _repeat_kv(v, heads)
    bias = None if mask.visible is None else _additive_bias(mask.visible, q.dtype, heads)
    if q.is_cuda:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, mask.causal, scale=scale)
        lse = lse[..., :q.shape[2]]  # rows padded to a multiple of 32
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask.causal, attn_mask=bias, scale=scale)
    if mask.visible is not None:
        blind = ~mask.visible.any(-1)[:, None]  # [batch, 1, M]
        out = out.masked_fill(blind[..., None], 0)
        lse = lse.masked_fill(blind, -math.inf)
    return out, lse


def _block_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, mask: BlockMask,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of dq [batch, heads, M, d], dk and dv [batch, kv_heads, N, d], given grad_out,
    out [batch, heads, M, d] (q's dtype) and lse [batch, heads, M] of the whole attention, not the block's."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k, v = _repeat_kv(k, heads), _repeat_kv(v, heads)
    bias = None if mask.visible is None else _additive_bias(mask.visible, q.dtype, heads)
    if q.is_cuda:
        lse = F.pad(lse, (0, -q.shape[2] % 32))  # the layout the forward kernel returns it in
        unused = q.new_empty((), dtype=torch.int64)  # philox seed and offset: no dropout
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, bias, out, lse, unused, unused, 0.0, [True, True, True, False], mask.causal,
            scale=scale)
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, mask.causal, attn_mask=bias, scale=scale)
    return dq, _sum_groups(dk, kv_heads), _sum_groups(dv, kv_heads)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block into the running attention, in place: out [batch, heads, M, d] and lse [batch, heads, M]
    become lse' = log(e^lse + e^lse_b), out' = e^(lse − lse') out + e^(lse_b − lse') out_b."""
    merged = torch.logaddexp(lse, block_lse)
    # Rows that have seen no key yet stay at out = 0, lse = −inf (−inf − (−inf) would be NaN).
    shift = merged.masked_fill(merged == -math.inf, 0)
    out.mul_(torch.exp(lse - shift)[..., None]).add_(block_out * torch.exp(block_lse - shift)[..., None])
    lse.copy_(merged)


# ---------------------------------------------------------------------------
# Every block of this rank's queries against one rank's K/V (``kv [2, batch, local_seq, kv_heads, d]``)


def _attend(q: torch.Tensor, kv: torch.Tensor, source: int, plan: BlockPlan, out: torch.Tensor,
            lse: torch.Tensor) -> None:
    """Fold the key chunks of cp rank ``source`` into the running ``out``, ``lse`` of this rank's queries
    q [batch, heads, local_seq, d]."""
    scale = q.shape[-1] ** -0.5
    for rows, cols, mask in plan.pairs(source):
        k, v = kv[:, :, cols].transpose(2, 3)
        block_out, block_lse = _block_forward(q[:, :, rows], k, v, mask, scale)
        _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)


def _attend_backward(grad_out: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, kv: torch.Tensor,
                     source: int, plan: BlockPlan, dq: torch.Tensor) -> torch.Tensor:
    """Add to ``dq`` the gradient through the keys of cp rank ``source``; return their d[k, v]
    ``[2, batch, local_seq, kv_heads, d]`` (dq's dtype)."""
    scale = q.shape[-1] ** -0.5
    dkv = torch.zeros(kv.shape, dtype=dq.dtype, device=kv.device)
    for rows, cols, mask in plan.pairs(source):
        k, v = kv[:, :, cols].transpose(2, 3)
        dq_block, dk, dv = _block_backward(grad_out[:, :, rows], q[:, :, rows], k, v, out[:, :, rows],
                                           lse[:, :, rows], mask, scale)
        dq[:, :, rows] += dq_block
        dkv[:, :, cols] += torch.stack([dk, dv]).transpose(2, 3)
    return dkv


# ---------------------------------------------------------------------------
# How the K/V blocks reach each rank


def _ring(kv: torch.Tensor, group: Group) -> Iterator[tuple[int, torch.Tensor]]:
    """(source rank, its K/V) for the cp ranks r, r − 1, …, r + 1: step s holds the block of rank r − s and
    has already sent it on to r + 1, so the exchange runs while the caller computes with the block."""
    for step in range(group.size):
        arriving = ring_exchange(kv, group) if step + 1 < group.size else None
        yield (group.rank - step) % group.size, kv
        if arriving is not None:
            kv = arriving()


def _ring_gradients(kv: torch.Tensor, group: Group,
                    gradient: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """d[k, v] of this rank's K/V: the K/V go around the ring again, and with each the running sum of its
    gradients; ``gradient(source, kv)`` is this rank's share. Step s adds it to the sum that rank r − 1
    had for the same block; after the last step the sums move once more and each lands on its owner."""
    moving = None
    for source, block in _ring(kv, group):
        grad = gradient(source, block)
        if moving is not None:
            grad += moving()
        moving = ring_exchange(grad, group)
    return moving()


def _gathered(kv: torch.Tensor, group: Group) -> Iterator[tuple[int, torch.Tensor]]:
    """(source rank, its K/V) for every cp rank, from one all-gather."""
    everyone = all_gather(kv[None], group)
    for source in range(group.size):
        yield source, everyone[source]


def _gathered_gradients(kv: torch.Tensor, group: Group,
                        gradient: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """d[k, v] of this rank's K/V: all-gather the K/V again, then reduce-scatter every rank's gradients."""
    grads = torch.stack([gradient(source, block) for source, block in _gathered(kv, group)])
    return reduce_scatter(grads, group)[0]


class _ContextAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the fp32 lse; the backward recomputes each block from them."""

    @staticmethod
    def forward(ctx, q, k, v, layout: SequenceLayout, gather_kv: bool):
        ring = not gather_kv and layout.group.size > 1  # all-gather and reduce-scatter of one rank: no communication
        plan = BlockPlan(layout, q.device)
        q_t = q.transpose(1, 2)
        accumulate = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros(q_t.shape, dtype=accumulate, device=q.device)
        lse = torch.full(q_t.shape[:3], -math.inf, dtype=accumulate, device=q.device)
        for source, kv in (_ring if ring else _gathered)(torch.stack([k, v]), layout.group):
            _attend(q_t, kv, source, plan, out, lse)
        # [batch, seq, heads, d] contiguous: the CUDA backward kernel assumes that row stride of ``out``.
        out = out.to(q.dtype).transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.ring = layout, ring
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        plan = BlockPlan(ctx.layout, q.device)
        q_t, out_t, grad_t = q.transpose(1, 2), out.transpose(1, 2), grad.transpose(1, 2)
        dq = torch.zeros(q_t.shape, dtype=lse.dtype, device=q.device)

        def gradient(source: int, kv: torch.Tensor) -> torch.Tensor:
            return _attend_backward(grad_t, q_t, out_t, lse, kv, source, plan, dq)

        dkv = (_ring_gradients if ctx.ring else _gathered_gradients)(torch.stack([k, v]), ctx.layout.group, gradient)
        return dq.transpose(1, 2).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None
