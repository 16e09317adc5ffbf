"""Softmax attention mixer (pattern ``*``): causal, grouped-query, rotary."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamix.nn.context import ForwardContext
from megamix.nn.rotary import apply_rotary
from megamix.parallel import (
    NO_TENSOR_PARALLEL,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
)
from megamix.parallel.context_parallel import SequenceLayout
from megamix.parallel.ring_attention import context_attention
from megamix.parallel.tensor_parallel import tp_input

try:
    from flash_attn import flash_attn_func
except ImportError:  # CUDA-only source build, shipped in the optional `gpu` extra
    flash_attn_func = None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √head_dim + causal mask) v, each query head reading kv head ``h // (heads / kv_heads)``.

    q ``[batch, seq, heads, head_dim]``, k and v ``[batch, seq, kv_heads, head_dim]``
    → ``[batch, seq, heads, head_dim]``. flash-attn when it can run (CUDA, fp16/bf16),
    otherwise PyTorch SDPA; both take the kv heads as they are, without repeating them.
    """
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=True)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequence: SequenceLayout) -> torch.Tensor:
    """:func:`causal_attention` over this rank's tokens of ``sequence`` (same shapes): each query sees the keys
    at earlier positions of its document, on this rank or (context parallelism) on the others."""
    if sequence.is_trivial:
        return causal_attention(q, k, v)
    return context_attention(q, k, v, sequence, gather_kv=sequence.attention_comm == "all_gather")


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Attention of the ``new`` last tokens over every token seen so far (generation with a KV cache).

    q ``[batch, new, heads, head_dim]``, k and v ``[batch, seen, kv_heads, head_dim]`` (the new tokens last),
    valid ``[batch, seen]`` (False: left padding) → ``[batch, new, heads, head_dim]``. Query i, at cache
    position p = seen − new + i, reads the valid keys at positions ≤ p, and always itself, so a padding
    query reads only itself and stays finite.
    """
    new, seen = q.shape[1], k.shape[1]
    keys = torch.arange(seen, device=q.device)
    queries = torch.arange(seen - new, seen, device=q.device)[:, None]
    allowed = (keys <= queries) & (valid[:, None, :] | (keys == queries))  # [batch, new, seen]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=allowed[:, None], enable_gqa=True)
    return out.transpose(1, 2)


@dataclass
class KVCache:
    """Generation state of a softmax-attention layer: rope(k) and v of every token seen so far,
    each ``[batch, seen, local kv heads, head_dim]``."""

    k: torch.Tensor
    v: torch.Tensor


class SplitRotaryFunction(torch.autograd.Function):
    """``qkv [batch, seq, (heads + 2·kv_heads)·head_dim] → rope(q), rope(k), v``, each a contiguous
    ``[batch, seq, heads_i, head_dim]`` (``heads`` lists the widths of [q | k | v] in heads).

    The attention kernel runs measurably faster on separate contiguous q, k, v
    than on views into the fused qkv output. Backward rotates dq and dk back and
    copies dv straight into the parts of one ``d qkv`` buffer, where autograd
    through split, rotary and copy would make separate gradients and concatenate them.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: list[int], cos: torch.Tensor, sin: torch.Tensor):
        batch, seq, _ = qkv.shape
        q, k, v = qkv.view(batch, seq, sum(heads), -1).split(heads, dim=2)
        ctx.heads = heads
        ctx.save_for_backward(cos, sin)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.contiguous()

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        cos, sin = ctx.saved_tensors
        batch, seq, _, head_dim = grad_q.shape
        grad_qkv = grad_q.new_empty(batch, seq, sum(ctx.heads), head_dim)
        into_q, into_k, into_v = grad_qkv.split(ctx.heads, dim=2)
        apply_rotary(grad_q, cos, -sin, out=into_q)
        apply_rotary(grad_k, cos, -sin, out=into_k)
        into_v.copy_(grad_v)
        return grad_qkv.view(batch, seq, -1), None, None, None


class Attention(nn.Module):
    """Causal grouped-query attention with rotary embeddings.

    ``x [batch, seq, hidden] → [batch, seq, hidden]``:
    [q | k | v] = W_qkv x; q, k ← rope(q), rope(k); o = attention(q, k, v); y = W_out o.
    ``qkv_proj`` output is ordered [q heads | k heads | v heads], each head ``head_dim``
    wide. Under tensor parallelism each rank holds ``num_heads / tp`` query heads and
    the kv heads they read (``num_kv_heads / tp``, or one replicated kv head when
    there are fewer kv heads than ranks); ``x`` may be sequence-sharded (SP).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 tp: TensorParallel = NO_TENSOR_PARALLEL):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.tp = tp
        kv_shards = min(num_kv_heads, tp.size)
        self.qkv_proj = ColumnParallelLinear(hidden_size, [d * head_dim for d in (num_heads, num_kv_heads, num_kv_heads)],
                                             tp, shards=[tp.size, kv_shards, kv_shards])
        self.local_heads = [width // head_dim for width in self.qkv_proj.local_parts]
        self.out_proj = RowParallelLinear(num_heads * head_dim, hidden_size, tp)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.project_out(attention(*self.project_in(tp_input(x, self.tp), ctx), ctx.sequence))

    def initial_state(self, batch: int, device: torch.device | str) -> KVCache:
        """The empty KV cache of generation (fp32; it takes the dtype of the first keys appended)."""
        empty = torch.zeros(batch, 0, self.local_heads[1], self.head_dim, device=device)
        return KVCache(empty, empty)

    def extend(self, x: torch.Tensor, ctx: ForwardContext, state: KVCache,
               valid: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Generation: ``new`` tokens ``x [batch, new, hidden]`` after those in ``state`` → ``[batch, new, hidden]``
        and the cache with them appended. ``ctx`` holds the rotary tables of their positions, ``valid
        [batch, seen]`` marks the real tokens of the cache and the new ones (False: left padding)."""
        heads, state = self.attend_cached(tp_input(x, self.tp), ctx, state, valid)
        return self.project_out(heads), state

    def attend_cached(self, x: torch.Tensor, ctx: ForwardContext, state: KVCache,
                      valid: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """The head outputs ``[batch, new, local heads, head_dim]`` of :meth:`extend`, and the grown cache."""
        q, k, v = self.project_in(x, ctx)
        state = KVCache(torch.cat([state.k.to(k.dtype), k], dim=1), torch.cat([state.v.to(v.dtype), v], dim=1))
        return cached_attention(q, state.k, state.v, valid), state

    def project_in(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The full-sequence input ``x [batch, seq, hidden]`` (:func:`tp_input`: gathered under SP, so
        a subclass can share it) → rope(q) ``[batch, seq, local q heads, head_dim]``, rope(k) and v
        ``[batch, seq, local kv heads, head_dim]``."""
        qkv = F.linear(x, self.qkv_proj.weight)  # x is already the replicated input qkv_proj would gather
        return SplitRotaryFunction.apply(qkv, self.local_heads, ctx.rope_cos, ctx.rope_sin)

    def project_out(self, heads: torch.Tensor) -> torch.Tensor:
        """This rank's head outputs ``[batch, seq, local heads, head_dim]`` → W_out · concat(heads)
        ``[batch, seq, hidden]`` (``seq / tp`` under SP), summed over the TP ranks."""
        return self.out_proj(heads.flatten(2))

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of one token in a sequence of ``seq_len``.

        2 per multiply-add: the projections 2·hidden·(heads + 2·kv_heads + heads)·head_dim,
        plus q kᵀ and p v, 2·2·heads·head_dim·seq_len. The attention products are
        counted over the full seq_len keys, not the causal half: the convention of
        Megatron-LM, torchtitan and torch's FlopCounterMode, so MFU compares with
        theirs (a causal kernel does about half of this work).
        """
        projections = 2 * self.hidden_size * (2 * self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return projections + 2 * 2 * self.num_heads * self.head_dim * seq_len
