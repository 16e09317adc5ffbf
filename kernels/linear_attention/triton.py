"""Chunked linear attention with decay as Triton kernels (Lightning Attention-2 style), forward and backward.

Per head, with state ``S [key_dim, value_dim]`` in fp32 (shapes and references in :mod:`.naive`):

    S_t = e^{g_t} S_{t−1} + k_tᵀ v_t,        o_t = scale · q_t S_t,        S_{−1} = initial state.

Each sequence is cut into blocks of ``BLOCK_T`` tokens, aligned to its first token. In a block, with
G the within-block inclusive cumsum of g, G_last its last value, D_ts = e^{G_t − G_s} for s ≤ t (else 0)
and H the state entering the block (fp32, carried from block to block):

    O = scale · [((Q Kᵀ) ⊙ D) V + (Q ⊙ e^G) H],          H ← e^{G_last} H + (K ⊙ e^{G_last − G})ᵀ V.

Backward, with dO the output gradient and dH the gradient of the state leaving the block (from the later
blocks and dS_final), a forward sweep for dq and a reverse sweep for dk, dv:

    dQ = scale · [((dO Vᵀ) ⊙ D) K + (dO Hᵀ) ⊙ e^G]
    dK = scale · ((dO Vᵀ) ⊙ D)ᵀ Q + (V dHᵀ) ⊙ e^{G_last − G}
    dV = scale · ((Q Kᵀ) ⊙ D)ᵀ dO + (K ⊙ e^{G_last − G}) dH
    dH ← e^{G_last} dH + scale · (Q ⊙ e^G)ᵀ dO,

and dS_initial is dH after the first block. For the decay, with G now the cumsum over the whole sequence,
every term that holds q_t carries e^{G_t}, every term that holds k_s carries e^{−G_s} and S_final carries
e^{G_last}, so dL/dG_t = q_t·dq_t − k_t·dk_t (+ <dS_final, S_final> at the last token), and dg is its
reverse cumsum within the sequence: the dq sweep writes q_t·dq_t and <dS_final, S_final>, and the reverse
sweep subtracts k_t·dk_t and carries the running sum, starting from <dS_final, S_final>.

One program runs one (sequence, head, value tile) through its whole sequence. Value columns of the state
are independent, so o, dv and the state split exactly over value tiles; dq, dk and dg are sums over value
columns, so each tile writes a partial that the host adds up. Only the inputs are saved for backward (the
sweeps recompute the state): memory O(seq). Dot operands are 16-bit when q, k, v are (fp32 accumulation),
fp32 otherwise (three TF32 products, about fp32 accuracy); under ``TRITON_INTERPRET=1`` always fp32, since
the interpreter multiplies bf16 wrongly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megamix_kernels.linear_attention.naive import per_token_log_decay

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Value columns per program: small under the interpreter so that tests cover several value tiles.
MAX_BLOCK_V = 32 if INTERPRETED else 64


def _autotune_configs() -> list[triton.Config]:
    """Token block sizes and launch shapes to try on a GPU; one config under the interpreter."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_T": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_T": block}, num_warps=warps, num_stages=stages)
            for block in (16, 32, 64) for warps in (4, 8) for stages in (1, 2)]


@triton.jit
def _program_tiles(cu_seqlens, seq_len, heads, key_heads,
                   BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, VARLEN: tl.constexpr):
    """What this program owns: its (sequence, head) index ``sequence · heads + head``, value tile, head, key
    head, first and one-past-last token (int64, flattened ``batch · seq`` order), key and value columns."""
    sequence_head = tl.program_id(0)
    value_tile = tl.program_id(1)
    sequence = sequence_head // heads
    head = sequence_head % heads
    if VARLEN:
        start = tl.load(cu_seqlens + sequence).to(tl.int64)
        end = tl.load(cu_seqlens + sequence + 1).to(tl.int64)
    else:
        start = sequence.to(tl.int64) * seq_len
        end = start + seq_len
    keys = tl.arange(0, BLOCK_K)
    values = value_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    return sequence_head, value_tile, head, head // (heads // key_heads), start, end, keys, values


@triton.jit
def _rows(base, tokens, token_mask, row_stride, columns, column_count):
    """Pointers and mask of the ``[BLOCK_T, BLOCK_C]`` block at rows ``tokens`` of a token-major tensor."""
    pointers = base + tokens[:, None] * row_stride + columns[None, :]
    return pointers, token_mask[:, None] & (columns < column_count)[None, :]


@triton.jit
def _load_rows(base, tokens, token_mask, row_stride, columns, column_count):
    """The ``[BLOCK_T, BLOCK_C]`` block at rows ``tokens`` (zero where masked), in the tensor's dtype."""
    pointers, mask = _rows(base, tokens, token_mask, row_stride, columns, column_count)
    return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, block, tokens, token_mask, row_stride, columns, column_count):
    """Store a ``[BLOCK_T, BLOCK_C]`` block at rows ``tokens``, cast to the tensor's dtype."""
    pointers, mask = _rows(base, tokens, token_mask, row_stride, columns, column_count)
    tl.store(pointers, block.to(pointers.dtype.element_ty), mask=mask)


@triton.jit
def _load_block(q, k, v, g, tokens, token_mask, head, key_head, keys, values, heads, key_heads, key_dim, value_dim):
    """Q, K ``[BLOCK_T, BLOCK_K]`` and V ``[BLOCK_T, BLOCK_V]`` of one block (zero past the sequence end),
    G (the within-block inclusive cumsum of g, ``[BLOCK_T]``, fp32) and G_last."""
    q_block = _load_rows(q + key_head * key_dim, tokens, token_mask, key_heads * key_dim, keys, key_dim)
    k_block = _load_rows(k + key_head * key_dim, tokens, token_mask, key_heads * key_dim, keys, key_dim)
    v_block = _load_rows(v + head * value_dim, tokens, token_mask, heads * value_dim, values, value_dim)
    log_decay = tl.load(g + tokens * heads + head, mask=token_mask, other=0.0)
    return q_block, k_block, v_block, tl.cumsum(log_decay, 0), tl.sum(log_decay, 0)


@triton.jit
def _state_tile(base, sequence_head, keys, values, key_dim, value_dim):
    """Pointers and mask of this program's ``[BLOCK_K, BLOCK_V]`` tile of a ``[sequences, heads, key_dim,
    value_dim]`` state tensor."""
    pointers = base + sequence_head.to(tl.int64) * key_dim * value_dim + keys[:, None] * value_dim + values[None, :]
    return pointers, (keys[:, None] < key_dim) & (values[None, :] < value_dim)


@triton.jit
def _load_state_tile(base, sequence_head, keys, values, key_dim, value_dim,
                     BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRESENT: tl.constexpr):
    """The state tile in fp32, zeros when the state is absent (``base`` None)."""
    if PRESENT:
        pointers, mask = _state_tile(base, sequence_head, keys, values, key_dim, value_dim)
        tile = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    else:
        tile = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    return tile


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b with operands cast to DOT_DTYPE and an fp32 result; fp32 operands use three TF32 products
    (about fp32 accuracy on tensor cores)."""
    if DOT_DTYPE == tl.float32:
        product = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision="tf32x3")
    else:
        product = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))
    return product


@triton.jit
def _block_decay(cumulative, BLOCK_T: tl.constexpr):
    """D ``[BLOCK_T, BLOCK_T]``: D_ts = e^{G_t − G_s} for s ≤ t, else 0 (``cumulative`` = G)."""
    positions = tl.arange(0, BLOCK_T)
    causal = positions[:, None] >= positions[None, :]
    return tl.exp(tl.where(causal, cumulative[:, None] - cumulative[None, :], float("-inf")))


@triton.jit
def _advance_state(state, k_block, v_block, cumulative, total, DOT_DTYPE: tl.constexpr):
    """H ← e^{G_last} H + (K ⊙ e^{G_last − G})ᵀ V: the state leaving a block from the state entering it."""
    k_decayed = k_block * tl.exp(total - cumulative)[:, None]
    return tl.exp(total) * state + _dot(tl.trans(k_decayed), v_block, DOT_DTYPE)


@triton.autotune(configs=_autotune_configs(), key=["key_dim", "value_dim"])
@triton.jit
def _forward_kernel(q, k, v, g, out, initial_state, final_state, cu_seqlens, scale, seq_len,
                    heads, key_heads, key_dim, value_dim,
                    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, VARLEN: tl.constexpr,
                    HAS_INITIAL_STATE: tl.constexpr, HAS_FINAL_STATE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """o and the final state of one (sequence, head, value tile). q, k ``[tokens, key_heads, key_dim]``,
    v, out ``[tokens, heads, value_dim]``, g ``[tokens, heads]`` fp32, states ``[sequences, heads, key_dim,
    value_dim]`` fp32; grid ``(sequences · heads, value tiles)``."""
    sequence_head, _, head, key_head, start, end, keys, values = _program_tiles(
        cu_seqlens, seq_len, heads, key_heads, BLOCK_K, BLOCK_V, VARLEN)
    state = _load_state_tile(initial_state, sequence_head, keys, values, key_dim, value_dim,
                             BLOCK_K, BLOCK_V, HAS_INITIAL_STATE)
    for block in range(tl.cdiv(end - start, BLOCK_T)):
        tokens = start + block * BLOCK_T + tl.arange(0, BLOCK_T)
        token_mask = tokens < end
        q_block, k_block, v_block, cumulative, total = _load_block(
            q, k, v, g, tokens, token_mask, head, key_head, keys, values, heads, key_heads, key_dim, value_dim)

        attention = _dot(q_block, tl.trans(k_block), DOT_DTYPE) * _block_decay(cumulative, BLOCK_T)
        o_block = _dot(attention, v_block, DOT_DTYPE)
        o_block += _dot(q_block * tl.exp(cumulative)[:, None], state, DOT_DTYPE)
        _store_rows(out + head * value_dim, scale * o_block, tokens, token_mask, heads * value_dim, values, value_dim)
        state = _advance_state(state, k_block, v_block, cumulative, total, DOT_DTYPE)

    if HAS_FINAL_STATE:
        pointers, mask = _state_tile(final_state, sequence_head, keys, values, key_dim, value_dim)
        tl.store(pointers, state, mask=mask)


@triton.autotune(configs=_autotune_configs(), key=["key_dim", "value_dim"])
@triton.jit
def _backward_dq_kernel(q, k, v, g, grad_out, initial_state, grad_final_state,
                        grad_q_partial, grad_log_cumulative_q, final_state_products,
                        cu_seqlens, scale, seq_len, tokens_total, heads, key_heads, key_dim, value_dim,
                        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, VARLEN: tl.constexpr,
                        HAS_INITIAL_STATE: tl.constexpr, HAS_FINAL_STATE_GRAD: tl.constexpr,
                        DOT_DTYPE: tl.constexpr):
    """Forward sweep: this value tile's part of dq and of the q and final-state terms of dL/dG.

    grad_q_partial ``[value tiles, tokens, heads, key_dim]`` fp32 ← dq per head (before the key-group sum);
    grad_log_cumulative_q ``[value tiles, tokens, heads]`` fp32 ← q_t·dq_t; final_state_products
    ``[value tiles, sequences · heads]`` fp32 ← <dS_final, S_final>. Other shapes as in :func:`_forward_kernel`.
    """
    sequence_head, value_tile, head, key_head, start, end, keys, values = _program_tiles(
        cu_seqlens, seq_len, heads, key_heads, BLOCK_K, BLOCK_V, VARLEN)
    grad_q_head = grad_q_partial + value_tile.to(tl.int64) * tokens_total * heads * key_dim + head * key_dim
    grad_log_q_head = grad_log_cumulative_q + value_tile.to(tl.int64) * tokens_total * heads + head

    state = _load_state_tile(initial_state, sequence_head, keys, values, key_dim, value_dim,
                             BLOCK_K, BLOCK_V, HAS_INITIAL_STATE)
    for block in range(tl.cdiv(end - start, BLOCK_T)):
        tokens = start + block * BLOCK_T + tl.arange(0, BLOCK_T)
        token_mask = tokens < end
        q_block, k_block, v_block, cumulative, total = _load_block(
            q, k, v, g, tokens, token_mask, head, key_head, keys, values, heads, key_heads, key_dim, value_dim)
        grad_out_block = _load_rows(grad_out + head * value_dim, tokens, token_mask, heads * value_dim,
                                    values, value_dim)

        grad_attention = _dot(grad_out_block, tl.trans(v_block), DOT_DTYPE) * _block_decay(cumulative, BLOCK_T)
        grad_q = _dot(grad_attention, k_block, DOT_DTYPE)
        grad_q += _dot(grad_out_block, tl.trans(state), DOT_DTYPE) * tl.exp(cumulative)[:, None]
        grad_q *= scale
        _store_rows(grad_q_head, grad_q, tokens, token_mask, heads * key_dim, keys, key_dim)
        tl.store(grad_log_q_head + tokens * heads, tl.sum(q_block * grad_q, 1), mask=token_mask)
        state = _advance_state(state, k_block, v_block, cumulative, total, DOT_DTYPE)

    if HAS_FINAL_STATE_GRAD:
        grad_final = _load_state_tile(grad_final_state, sequence_head, keys, values, key_dim, value_dim,
                                      BLOCK_K, BLOCK_V, True)
        product = tl.sum(tl.sum(grad_final * state, 1), 0)
        tl.store(final_state_products + value_tile * tl.num_programs(0) + sequence_head, product)


@triton.autotune(configs=_autotune_configs(), key=["key_dim", "value_dim"])
@triton.jit
def _backward_dkv_kernel(q, k, v, g, grad_out, grad_final_state, grad_log_cumulative_q, final_state_products,
                         grad_k_partial, grad_v, grad_g_partial, grad_initial_state,
                         cu_seqlens, scale, seq_len, tokens_total, heads, key_heads, key_dim, value_dim,
                         BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, VARLEN: tl.constexpr,
                         HAS_INITIAL_STATE: tl.constexpr, HAS_FINAL_STATE_GRAD: tl.constexpr,
                         DOT_DTYPE: tl.constexpr):
    """Reverse sweep carrying dH: dk (partial), dv, dg (partial) and dS_initial of one value tile.

    grad_k_partial ``[value tiles, tokens, heads, key_dim]`` fp32 (per head); grad_v ``[tokens, heads,
    value_dim]`` in v's dtype; grad_g_partial ``[value tiles, tokens, heads]`` fp32 ← the sum over later
    tokens of the dq sweep's terms minus k_t·dk_t; grad_initial_state like the states.
    """
    sequence_head, value_tile, head, key_head, start, end, keys, values = _program_tiles(
        cu_seqlens, seq_len, heads, key_heads, BLOCK_K, BLOCK_V, VARLEN)
    grad_k_head = grad_k_partial + value_tile.to(tl.int64) * tokens_total * heads * key_dim + head * key_dim
    tile_offset = value_tile.to(tl.int64) * tokens_total * heads + head
    grad_log_q_head, grad_g_head = grad_log_cumulative_q + tile_offset, grad_g_partial + tile_offset

    grad_state = _load_state_tile(grad_final_state, sequence_head, keys, values, key_dim, value_dim,
                                  BLOCK_K, BLOCK_V, HAS_FINAL_STATE_GRAD)
    # dL/dG summed over the tokens after the current block; S_final carries e^{G_last}, which every dg_t holds.
    if HAS_FINAL_STATE_GRAD:
        grad_log_later = tl.load(final_state_products + value_tile * tl.num_programs(0) + sequence_head)
    else:
        grad_log_later = 0.0
    blocks = tl.cdiv(end - start, BLOCK_T)
    for reverse_block in range(blocks):
        tokens = start + (blocks - 1 - reverse_block) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_mask = tokens < end
        q_block, k_block, v_block, cumulative, total = _load_block(
            q, k, v, g, tokens, token_mask, head, key_head, keys, values, heads, key_heads, key_dim, value_dim)
        grad_out_block = _load_rows(grad_out + head * value_dim, tokens, token_mask, heads * value_dim,
                                    values, value_dim)
        decay = _block_decay(cumulative, BLOCK_T)
        to_block_end = tl.exp(total - cumulative)[:, None]

        attention = _dot(q_block, tl.trans(k_block), DOT_DTYPE) * decay
        grad_v_block = scale * _dot(tl.trans(attention), grad_out_block, DOT_DTYPE)
        grad_v_block += _dot(k_block * to_block_end, grad_state, DOT_DTYPE)
        _store_rows(grad_v + head * value_dim, grad_v_block, tokens, token_mask, heads * value_dim, values, value_dim)

        grad_attention = _dot(grad_out_block, tl.trans(v_block), DOT_DTYPE) * decay
        grad_k = scale * _dot(tl.trans(grad_attention), q_block, DOT_DTYPE)
        grad_k += _dot(v_block, tl.trans(grad_state), DOT_DTYPE) * to_block_end
        _store_rows(grad_k_head, grad_k, tokens, token_mask, heads * key_dim, keys, key_dim)

        grad_log = tl.load(grad_log_q_head + tokens * heads, mask=token_mask, other=0.0) - tl.sum(k_block * grad_k, 1)
        tl.store(grad_g_head + tokens * heads, tl.cumsum(grad_log, 0, reverse=True) + grad_log_later, mask=token_mask)
        grad_log_later += tl.sum(grad_log, 0)

        q_decayed = q_block * tl.exp(cumulative)[:, None]
        grad_state = tl.exp(total) * grad_state + scale * _dot(tl.trans(q_decayed), grad_out_block, DOT_DTYPE)

    if HAS_INITIAL_STATE:
        pointers, mask = _state_tile(grad_initial_state, sequence_head, keys, values, key_dim, value_dim)
        tl.store(pointers, grad_state, mask=mask)


def _dot_dtype(*tensors: torch.Tensor) -> tl.dtype:
    """16-bit dot operands when every input has that one 16-bit dtype (never under the interpreter)."""
    dtypes = {t.dtype for t in tensors}
    if INTERPRETED or len(dtypes) != 1:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtypes.pop(), tl.float32)


class _Geometry:
    """Sizes of one call and the launch arguments every kernel shares."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None):
        self.batch, self.seq_len, self.key_heads, self.key_dim = q.shape
        self.heads, self.value_dim = v.shape[2:]
        self.tokens = self.batch * self.seq_len
        self.sequences = self.batch if cu_seqlens is None else cu_seqlens.numel() - 1
        self.block_v = min(triton.next_power_of_2(max(self.value_dim, 16)), MAX_BLOCK_V)
        self.value_tiles = triton.cdiv(self.value_dim, self.block_v)
        self.grid = (self.sequences * self.heads, self.value_tiles)
        self.kernel_args = {
            "seq_len": self.seq_len, "heads": self.heads, "key_heads": self.key_heads, "key_dim": self.key_dim,
            "value_dim": self.value_dim, "BLOCK_K": triton.next_power_of_2(max(self.key_dim, 16)),
            "BLOCK_V": self.block_v, "VARLEN": cu_seqlens is not None, "DOT_DTYPE": _dot_dtype(q, k, v),
        }

    def state_shape(self) -> tuple[int, int, int, int]:
        return self.sequences, self.heads, self.key_dim, self.value_dim

    def sum_partials(self, partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[value tiles, tokens, heads, key_dim]`` per-head partials → ``[batch, seq, key_heads, key_dim]``."""
        group = self.heads // self.key_heads
        total = partial.sum(0).view(self.batch, self.seq_len, self.key_heads, group, self.key_dim).sum(3)
        return total.to(dtype)


class _LinearAttention(torch.autograd.Function):
    """Autograd of the kernels; g is the per-token log decay ``[batch, seq, heads]`` in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        q, k, v, g = (t.contiguous() for t in (q, k, v, g))
        if initial_state is not None:
            initial_state = initial_state.float().contiguous()
        geometry = _Geometry(q, k, v, cu_seqlens)
        out = torch.empty_like(v)
        final_state = v.new_empty(geometry.state_shape(), dtype=torch.float32) if output_final_state else None
        _forward_kernel[geometry.grid](
            q, k, v, g, out, initial_state, final_state, cu_seqlens, scale,
            HAS_INITIAL_STATE=initial_state is not None, HAS_FINAL_STATE=output_final_state,
            **geometry.kernel_args,
        )
        ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
        ctx.scale = scale
        return out, final_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_final_state):
        q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
        geometry = _Geometry(q, k, v, cu_seqlens)
        grad_out = grad_out.contiguous()
        if grad_final_state is not None:
            grad_final_state = grad_final_state.float().contiguous()
        per_tile_keys = (geometry.value_tiles, geometry.tokens, geometry.heads, geometry.key_dim)
        per_tile_tokens = (geometry.value_tiles, geometry.tokens, geometry.heads)
        flags = {"HAS_INITIAL_STATE": initial_state is not None, "HAS_FINAL_STATE_GRAD": grad_final_state is not None}

        grad_q_partial = q.new_empty(per_tile_keys, dtype=torch.float32)
        grad_log_cumulative_q = q.new_empty(per_tile_tokens, dtype=torch.float32)
        final_state_products = q.new_empty((geometry.value_tiles, geometry.sequences * geometry.heads),
                                           dtype=torch.float32)
        _backward_dq_kernel[geometry.grid](
            q, k, v, g, grad_out, initial_state, grad_final_state,
            grad_q_partial, grad_log_cumulative_q, final_state_products,
            cu_seqlens, ctx.scale, tokens_total=geometry.tokens, **flags, **geometry.kernel_args,
        )
        grad_k_partial = torch.empty_like(grad_q_partial)
        grad_v = torch.empty_like(v)
        grad_g_partial = torch.empty_like(grad_log_cumulative_q)
        grad_initial_state = torch.empty_like(initial_state) if initial_state is not None else None
        _backward_dkv_kernel[geometry.grid](
            q, k, v, g, grad_out, grad_final_state, grad_log_cumulative_q, final_state_products,
            grad_k_partial, grad_v, grad_g_partial, grad_initial_state,
            cu_seqlens, ctx.scale, tokens_total=geometry.tokens, **flags, **geometry.kernel_args,
        )
        grad_q = geometry.sum_partials(grad_q_partial, q.dtype)
        grad_k = geometry.sum_partials(grad_k_partial, k.dtype)
        grad_g = grad_g_partial.sum(0).view_as(g)
        return grad_q, grad_k, grad_v, grad_g, None, grad_initial_state, None, None


def triton_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                            scale: float = 1.0, initial_state: torch.Tensor | None = None,
                            output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None):
    """Chunked linear attention with decay; differentiable in q, k, v, log_decay and initial_state.

    q, k ``[batch, seq, key_heads, key_dim]``; v ``[batch, seq, heads, value_dim]``; log_decay ``[heads]`` or
    ``[batch, seq, heads]``; initial_state ``[sequences, heads, key_dim, value_dim]`` or None; cu_seqlens
    int ``[sequences + 1]`` from 0 to seq (batch of one) or None. Returns o ``[batch, seq, heads,
    value_dim]`` in v's dtype and the final state ``[sequences, heads, key_dim, value_dim]`` fp32 (or None).
    """
    batch, seq_len, key_heads, key_dim = q.shape
    heads, value_dim = v.shape[2:]
    if k.shape != q.shape or v.shape[:2] != (batch, seq_len) or heads % key_heads:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q and k "
                         "[batch, seq, key_heads, key_dim], v [batch, seq, heads, value_dim], heads % key_heads == 0")
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into a batch of one, got batch {batch}")
    sequences = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (sequences, heads, key_dim, value_dim):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected "
                         f"{(sequences, heads, key_dim, value_dim)}")
    g = per_token_log_decay(log_decay, batch, seq_len).float()
    return _LinearAttention.apply(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
