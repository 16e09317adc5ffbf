"""Chunked linear attention with decay in PyTorch: the CPU implementation (shapes in :mod:`.naive`).

Each sequence is cut into chunks of ``C`` tokens, aligned to its first token. Per head, with G the
cumulative log decay inside a chunk (inclusive), Γ = G_last its total and S the state entering it (fp32):

    O  = scale · [(Q Kᵀ ⊙ D) V + diag(e^G) Q S],      D_ts = e^{G_t − G_s} for s ≤ t, else 0;
    S' = e^Γ S + (diag(e^{Γ − G}) K)ᵀ V               (the state entering the next chunk).

Only differences of G inside one chunk are exponentiated. The intra-chunk terms are batched matmuls over
blocks of consecutive chunks (a few MiB, so that each block's tensors stay in cache and its buffers are
reused); the state is carried from chunk to chunk by a sequential scan, linear in the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import torch

from megamix_kernels.linear_attention.naive import per_token_log_decay, split_sequences

# Exponents are clamped at LOG_FLOOR (e^-40 ≈ 4e-18, far below the rounding of a sum that holds the
# diagonal weight 1): below ~1e-38 fp32 is subnormal, and subnormal arithmetic is ~100x slower on CPUs.
LOG_FLOOR = -40.0

# A block holds about this many (token, head) rows of every chunked tensor: enough for efficient batched
# matmuls, few enough that the block's [chunks, heads, C, C] tensors stay in cache (measured optimum).
BLOCK_ROWS = 8192


@dataclass(frozen=True)
class Block:
    """Consecutive chunks ``chunks`` holding the consecutive tokens ``tokens``; token ``tokens.start + i``
    sits in chunk ``chunks.start + chunk_index[i]`` at ``position[i]``."""

    chunks: slice
    tokens: slice
    chunk_index: torch.Tensor
    position: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return self.chunks.stop - self.chunks.start

    def gather(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Tokens ``x [tokens, heads, *dims]`` → this block's chunks ``out [chunks, heads, C, *dims]``,
        zero past the end of a sequence."""
        rows = x[self.tokens]
        chunks, size = out.shape[0], out.shape[2]
        if rows.shape[0] == chunks * size:  # every chunk full: one strided copy, no indexing
            out.copy_(rows.view(chunks, size, *rows.shape[1:]).transpose(1, 2))
        else:
            out.zero_().transpose(1, 2)[self.chunk_index, self.position] = rows.to(out.dtype)
        return out

    def scatter(self, chunked: torch.Tensor, out: torch.Tensor) -> None:
        """The inverse of :meth:`gather`: this block's tokens of ``chunked`` into ``out [tokens, heads, *dims]``."""
        rows = out[self.tokens]
        chunks, size = chunked.shape[0], chunked.shape[2]
        if rows.shape[0] == chunks * size:
            rows.view(chunks, size, *rows.shape[1:]).copy_(chunked.transpose(1, 2))
        else:
            rows.copy_(chunked.transpose(1, 2)[self.chunk_index, self.position])


class Workspace:
    """Per-block temporaries, allocated once for the largest block and reused by every block of a pass:
    fresh memory for each block costs more in page faults than the arithmetic on it."""

    def __init__(self, chunks: int, like: torch.Tensor, dtype: torch.dtype):
        self.chunks, self.like, self.dtype = chunks, like, dtype
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, chunks: int, *shape: int) -> torch.Tensor:
        """The buffer ``name`` as ``[chunks, *shape]``."""
        if name not in self.buffers:
            self.buffers[name] = self.like.new_empty(self.chunks, *shape, dtype=self.dtype)
        return self.buffers[name][:chunks]


@dataclass(frozen=True)
class ChunkPlan:
    """Where every token sits in the chunk layout, for the ``batch`` rows (or the packed sequences of
    ``cu_seqlens``) flattened into one token axis.

    Each sequence occupies ``max(1, ⌈length / C⌉)`` consecutive chunks (an empty sequence still has one,
    which carries its initial state through to its final state)."""

    chunk_size: int
    chunks_per_block: int
    num_sequences: int
    chunk_sequence: list[int]
    chunk_is_first: list[bool]
    chunk_is_last: list[bool]
    blocks: list[Block]
    sequence_end: torch.Tensor  # [tokens]: one past the last token of each token's sequence
    last_tokens: list[tuple[int, int]]  # (sequence, its last token) for every non-empty sequence

    @staticmethod
    def build(batch: int, seq: int, cu_seqlens: torch.Tensor | None, chunk_size: int, heads: int) -> ChunkPlan:
        spans = [slice(b * seq + span.start, b * seq + span.stop)
                 for b, span in split_sequences(cu_seqlens, batch, seq)]
        chunk_counts = [max(1, math.ceil((span.stop - span.start) / chunk_size)) for span in spans]
        first_chunks = [0, *accumulate(chunk_counts)]
        chunk_sequence = [n for n, count in enumerate(chunk_counts) for _ in range(count)]
        chunk_tokens = [slice(min(span.start + i * chunk_size, span.stop),
                              min(span.start + (i + 1) * chunk_size, span.stop))
                        for span, count in zip(spans, chunk_counts) for i in range(count)]
        chunk_is_first = [False] * len(chunk_sequence)
        chunk_is_last = [False] * len(chunk_sequence)
        for first, count in zip(first_chunks, chunk_counts):
            chunk_is_first[first] = chunk_is_last[first + count - 1] = True

        token = torch.arange(batch * seq)
        ends = torch.tensor([span.stop for span in spans], dtype=torch.long)
        token_sequence = torch.searchsorted(ends, token, right=True)
        local = token - torch.tensor([span.start for span in spans], dtype=torch.long)[token_sequence]
        token_chunk = torch.tensor(first_chunks[:-1], dtype=torch.long)[token_sequence] + local // chunk_size

        chunks_per_block = max(1, BLOCK_ROWS // (heads * chunk_size))
        blocks = []
        for first in range(0, len(chunk_sequence), chunks_per_block):
            chunks = slice(first, min(first + chunks_per_block, len(chunk_sequence)))
            tokens = slice(chunk_tokens[chunks.start].start, chunk_tokens[chunks.stop - 1].stop)
            blocks.append(Block(chunks, tokens, token_chunk[tokens] - first, local[tokens] % chunk_size))
        return ChunkPlan(
            chunk_size=chunk_size,
            chunks_per_block=chunks_per_block,
            num_sequences=len(spans),
            chunk_sequence=chunk_sequence,
            chunk_is_first=chunk_is_first,
            chunk_is_last=chunk_is_last,
            blocks=blocks,
            sequence_end=ends[token_sequence],
            last_tokens=[(n, span.stop - 1) for n, span in enumerate(spans) if span.stop > span.start],
        )

    def scan(self, block: Block, carried: torch.Tensor, updates: torch.Tensor, decay: torch.Tensor,
             boundary_in: torch.Tensor, boundary_out: torch.Tensor | None, previous: torch.Tensor | None,
             reverse: bool) -> torch.Tensor:
        """One block of the linear recurrence over chunks, in chunk order (``reverse``: backwards):

            carried_c = boundary_in[sequence] at the sequence's entry chunk, else result_{chunk before};
            result_c  = decay_c · carried_c + updates_c,   stored in boundary_out[sequence] at its exit chunk.

        carried (written), updates ``[block chunks, heads, key_dim, value_dim]``, decay ``[block chunks,
        heads, 1, 1]``, boundary_in/out ``[sequences, heads, key_dim, value_dim]`` (boundary_out None: not
        stored). ``previous`` is the result of the chunk scanned just before the block (None before the
        first); returns the result of the block's last. Forwards this carries the state (entry: a
        sequence's first chunk); backwards, the gradient of the state (entry: its last chunk).
        """
        entries, exits = ((self.chunk_is_last, self.chunk_is_first) if reverse
                          else (self.chunk_is_first, self.chunk_is_last))
        first = block.chunks.start
        order = range(block.chunks.stop - 1, first - 1, -1) if reverse else range(first, block.chunks.stop)
        carried, updates, decay = carried.unbind(0), updates.unbind(0), decay.unbind(0)
        last = None
        for chunk in order:
            sequence, i = self.chunk_sequence[chunk], chunk - first
            if entries[chunk]:
                carried[i].copy_(boundary_in[sequence])
            elif last is None:
                carried[i].copy_(previous)
            else:
                torch.addcmul(updates[last], decay[last], carried[last], out=carried[i])
            if exits[chunk] and boundary_out is not None:
                torch.addcmul(updates[i], decay[i], carried[i], out=boundary_out[sequence])
            last = i
        return torch.addcmul(updates[last], decay[last], carried[last])


def decay_matrix(cumulative: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``G [..., C] → D [..., C, C]`` into ``out``: D_ts = e^{G_t − G_s} for s ≤ t, 0 above the diagonal.
    The exponent is clamped to [LOG_FLOOR, 0] and the upper triangle zeroed after the exp (above the
    diagonal the differences are positive and could overflow, and exp(-inf) is slow)."""
    positions = torch.arange(cumulative.shape[-1], device=cumulative.device)
    causal = (positions.unsqueeze(-1) >= positions).to(out.dtype)
    torch.sub(cumulative.unsqueeze(-1), cumulative.unsqueeze(-2), out=out)
    return out.clamp_(LOG_FLOOR, 0).exp_().mul_(causal)


def decay_factors(cumulative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From G ``[chunks, key_heads, group, C]``: e^G and e^{Γ − G} ``[chunks, key_heads, group, C, 1]``
    (the decay from a chunk's start to each token, and from each token to the chunk's end) and the
    chunks' total decay e^Γ ``[chunks, heads, 1, 1]``, exponents clamped at LOG_FLOOR."""
    total = cumulative[..., -1:]
    return (cumulative.clamp_min(LOG_FLOOR).exp_().unsqueeze(-1),
            (total - cumulative).clamp_min_(LOG_FLOOR).exp_().unsqueeze(-1),
            total.clamp_min(LOG_FLOOR).exp_().flatten(1, 2).unsqueeze(-1))


def sum_group(x: torch.Tensor) -> torch.Tensor:
    """``[chunks, key_heads, group, ...] → [chunks, key_heads, ...]``, summed over the heads that read
    one key head (a view when that is one head)."""
    return x.squeeze(2) if x.shape[2] == 1 else x.sum(2)


@dataclass(frozen=True)
class Inputs:
    """q, k ``[tokens, key_heads, key_dim]``, v ``[tokens, heads, value_dim]`` and the per-token log decay
    ``[tokens, heads]``, the batch flattened into one token axis."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_decay: torch.Tensor
    scale: float
    chunk_size: int

    @staticmethod
    def flatten(q, k, v, log_decay, scale: float, chunk_size: int) -> Inputs:
        batch, seq, heads, value_dim = v.shape
        tokens, key_heads, key_dim = batch * seq, q.shape[2], q.shape[3]
        return Inputs(q.reshape(tokens, key_heads, key_dim), k.reshape(tokens, key_heads, key_dim),
                      v.reshape(tokens, heads, value_dim),
                      per_token_log_decay(log_decay, batch, seq).reshape(tokens, heads), scale, chunk_size)

    def load(self, block: Block, work: Workspace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A block's chunks in the workspace: scale · q and k ``[chunks, key_heads, C, key_dim]``,
        v ``[chunks, key_heads, group, C, value_dim]`` and G ``[chunks, key_heads, group, C]``, the heads
        split into key heads × the group of heads that reads each."""
        n, size = block.num_chunks, self.chunk_size
        (key_heads, key_dim), (heads, value_dim) = self.q.shape[1:], self.v.shape[1:]
        q = block.gather(self.q, work("q", n, key_heads, size, key_dim))
        if self.scale != 1:
            q.mul_(self.scale)
        k = block.gather(self.k, work("k", n, key_heads, size, key_dim))
        v = block.gather(self.v, work("v", n, heads, size, value_dim))
        cumulative = block.gather(self.log_decay, work("log_decay", n, heads, size)).cumsum_(-1)
        return q, k, v.unflatten(1, (key_heads, -1)), cumulative.unflatten(1, (key_heads, -1))


def scan_states(plan: ChunkPlan, block: Block, tail_k: torch.Tensor, v_chunks: torch.Tensor, chunk_decay: torch.Tensor,
                initial_state: torch.Tensor, finals: torch.Tensor | None, previous: torch.Tensor | None,
                work: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """The states entering a block's chunks ``[chunks, key_heads, group, key_dim, value_dim]`` and the
    state leaving its last chunk, from the chunks' contributions (diag(e^{Γ−G}) K)ᵀ V (``tail_k`` is
    diag(e^{Γ−G}) K, per head) and ``previous``, the state leaving the chunk before the block."""
    n, key_heads, group, _, key_dim = tail_k.shape
    value_dim = v_chunks.shape[-1]
    updates = torch.matmul(tail_k.mT, v_chunks, out=work("updates", n, key_heads, group, key_dim, value_dim))
    entering = work("entering", n, key_heads * group, key_dim, value_dim)
    leaving = plan.scan(block, entering, updates.flatten(1, 2), chunk_decay, initial_state, finals, previous,
                        reverse=False)
    return entering.unflatten(1, (key_heads, group)), leaving


class ChunkLinearAttentionFunction(torch.autograd.Function):
    """Chunked forward (module docstring) and its mirror backward. Saves q, k, v, the log decay, the
    initial and final states and the state entering each block ``[blocks, heads, key_dim, value_dim]``,
    from which the backward recomputes the states entering the block's chunks.

    Backward per chunk, with dO the output gradient, dH the gradient of the state leaving the chunk
    (a reverse scan: dH ← e^Γ dH + (diag(e^G) Q)ᵀ dO, from dS_final), P = Q Kᵀ ⊙ D and dP = dO Vᵀ:

        dQ = (dP ⊙ D) K + diag(e^G) dO Sᵀ,         dK = (dP ⊙ D)ᵀ Q + diag(e^{Γ−G}) V dHᵀ,
        dV = Pᵀ dO + diag(e^{Γ−G}) K dH,           dS_initial = e^Γ dH + (diag(e^G) Q)ᵀ dO (first chunk),

    with the scale folded into Q, and dQ, dK summed over the heads that read one key head. The log decay
    enters only through q_t e^{G_t}, k_s e^{−G_s} and the final state's factor e^{G_last}, so per head,
    with G the cumulative sum along the sequence, ∂L/∂G_t = q_t·dq_t − k_t·dk_t (+ ⟨dS_final, S_final⟩ at
    the last token), where q_t·dq_t = Σ_s (P ⊙ dP)_ts + q_t·(e^{G_t} dO_t Sᵀ) and k_t·dk_t = v_t·dv_t
    (k_t and v_t enter only as the pair k_tᵀ v_t); ∂L/∂g is ∂L/∂G summed backwards within each sequence.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale: float, plan: ChunkPlan):
        heads, value_dim = v.shape[2:]
        key_heads, key_dim = q.shape[2:]
        group, size = heads // key_heads, plan.chunk_size
        dtype = torch.promote_types(torch.result_type(q, v), torch.float32)
        inputs = Inputs.flatten(q, k, v, log_decay, scale, size)
        state_shape = (heads, key_dim, value_dim)
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        initial_state = (v.new_zeros(plan.num_sequences, *state_shape, dtype=dtype) if initial_state is None
                         else initial_state.to(dtype))
        finals = v.new_empty(plan.num_sequences, *state_shape, dtype=dtype)
        checkpoints = v.new_zeros(len(plan.blocks), *state_shape, dtype=dtype)
        out = torch.empty_like(inputs.v)
        work = Workspace(plan.chunks_per_block, v, dtype)
        previous = None
        for index, block in enumerate(plan.blocks):
            n = block.num_chunks
            if previous is not None:
                checkpoints[index] = previous
            q_chunks, k_chunks, v_chunks, cumulative = inputs.load(block, work)
            scores = torch.matmul(q_chunks, k_chunks.mT, out=work("scores", n, key_heads, size, size))
            weights = decay_matrix(cumulative, work("weights", n, key_heads, group, size, size))
            out_chunks = torch.matmul(weights.mul_(scores.unsqueeze(2)), v_chunks,
                                      out=work("out", n, key_heads, group, size, value_dim))
            head, tail, chunk_decay = decay_factors(cumulative)
            tail_k = torch.mul(k_chunks.unsqueeze(2), tail, out=work("tail_k", n, key_heads, group, size, key_dim))
            entering, previous = scan_states(plan, block, tail_k, v_chunks, chunk_decay, initial_state, finals,
                                             previous, work)
            inter = torch.matmul(q_chunks.unsqueeze(2), entering,
                                 out=work("inter", n, key_heads, group, size, value_dim))
            block.scatter(out_chunks.addcmul_(head, inter).flatten(1, 2), out)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, checkpoints, finals)
        ctx.plan, ctx.scale, ctx.dtype = plan, scale, dtype
        ctx.set_materialize_grads(False)
        return out.view(v.shape), finals

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        q, k, v, log_decay, initial_state, checkpoints, finals = ctx.saved_tensors
        plan, scale, dtype = ctx.plan, ctx.scale, ctx.dtype
        batch, seq, heads, value_dim = v.shape
        key_heads, key_dim = q.shape[2:]
        group, size = heads // key_heads, plan.chunk_size
        inputs = Inputs.flatten(q, k, v, log_decay, scale, size)
        grad_out = (torch.zeros_like(v) if grad_out is None else grad_out).reshape(inputs.v.shape)
        grad_final = torch.zeros_like(finals) if grad_final is None else grad_final.to(dtype)
        needs_decay_grad = ctx.needs_input_grad[3]
        grad_q, grad_k, grad_v = (torch.empty_like(x) for x in (inputs.q, inputs.k, inputs.v))
        grad_cumulative = inputs.log_decay.new_empty(inputs.log_decay.shape, dtype=dtype) if needs_decay_grad else None
        grad_initial = torch.empty_like(finals)
        work = Workspace(plan.chunks_per_block, v, dtype)
        previous = None
        for index in reversed(range(len(plan.blocks))):
            block = plan.blocks[index]
            n = block.num_chunks
            q_chunks, k_chunks, v_chunks, cumulative = inputs.load(block, work)
            grad_chunks = block.gather(grad_out, work("grad", n, heads, size, value_dim))
            grad_chunks = grad_chunks.unflatten(1, (key_heads, group))
            scores = torch.matmul(q_chunks, k_chunks.mT, out=work("scores", n, key_heads, size, size))
            decay = decay_matrix(cumulative, work("decay", n, key_heads, group, size, size))
            weights = torch.mul(decay, scores.unsqueeze(2), out=work("weights", n, key_heads, group, size, size))
            grad_weights = torch.matmul(grad_chunks, v_chunks.mT,
                                        out=work("grad_weights", n, key_heads, group, size, size))
            grad_v_chunks = torch.matmul(weights.mT, grad_chunks,
                                         out=work("grad_v", n, key_heads, group, size, value_dim))
            if needs_decay_grad:
                grad_g = torch.linalg.vecdot(weights, grad_weights)
            grad_scores = sum_group(grad_weights.mul_(decay))

            head, tail, chunk_decay = decay_factors(cumulative)
            tail_k = torch.mul(k_chunks.unsqueeze(2), tail, out=work("tail_k", n, key_heads, group, size, key_dim))
            entering, _ = scan_states(plan, block, tail_k, v_chunks, chunk_decay, initial_state, None,
                                      checkpoints[index], work)
            grad_decayed = grad_chunks.mul_(head)
            grad_q_heads = torch.matmul(grad_decayed, entering.mT,
                                        out=work("grad_q_heads", n, key_heads, group, size, key_dim))
            if needs_decay_grad:
                grad_g += torch.linalg.vecdot(grad_q_heads, q_chunks.unsqueeze(2))
            grad_q_chunks = sum_group(grad_q_heads)
            grad_q_chunks.flatten(0, 1).baddbmm_(grad_scores.flatten(0, 1), k_chunks.flatten(0, 1))

            reads = torch.matmul(q_chunks.unsqueeze(2).mT, grad_decayed,
                                 out=work("reads", n, key_heads, group, key_dim, value_dim))
            leaving = work("leaving", n, heads, key_dim, value_dim)
            previous = plan.scan(block, leaving, reads.flatten(1, 2), chunk_decay, grad_final, grad_initial,
                                 previous, reverse=True)
            leaving = leaving.unflatten(1, (key_heads, group))
            tail_v = torch.mul(v_chunks, tail, out=work("tail_v", n, key_heads, group, size, value_dim))
            grad_k_chunks = sum_group(torch.matmul(tail_v, leaving.mT,
                                                   out=work("grad_k_heads", n, key_heads, group, size, key_dim)))
            grad_k_chunks.flatten(0, 1).baddbmm_(grad_scores.mT.flatten(0, 1), q_chunks.flatten(0, 1))
            grad_v_chunks.flatten(0, 2).baddbmm_(tail_k.flatten(0, 2), leaving.flatten(0, 2))

            if needs_decay_grad:
                grad_g -= torch.linalg.vecdot(v_chunks, grad_v_chunks)
                block.scatter(grad_g.flatten(1, 2), grad_cumulative)
            if scale != 1:
                grad_q_chunks.mul_(scale)
            block.scatter(grad_q_chunks, grad_q)
            block.scatter(grad_k_chunks, grad_k)
            block.scatter(grad_v_chunks.flatten(1, 2), grad_v)
        grad_log_decay = None
        if needs_decay_grad:
            grad_log_decay = reverse_cumsum_per_sequence(grad_cumulative, plan, grad_final, finals)
            grad_log_decay = grad_log_decay.view(batch, seq, heads)
            if log_decay.dim() == 1:
                grad_log_decay = grad_log_decay.sum((0, 1))
            grad_log_decay = grad_log_decay.to(log_decay.dtype)
        grad_initial = grad_initial.to(ctx.initial_dtype) if ctx.needs_input_grad[4] else None
        return (grad_q.view(q.shape), grad_k.view(k.shape), grad_v.view(v.shape), grad_log_decay, grad_initial,
                None, None)


def reverse_cumsum_per_sequence(grad_cumulative: torch.Tensor, plan: ChunkPlan, grad_final: torch.Tensor,
                                finals: torch.Tensor) -> torch.Tensor:
    """∂L/∂g_u = Σ_{t ≥ u in u's sequence} ∂L/∂G_t from ``grad_cumulative [tokens, heads]``, after adding
    ⟨dS_final, S_final⟩ at each sequence's last token: a suffix sum over the whole token axis in fp64, from
    which each sequence subtracts the sum of the tokens after it (fp64 keeps that difference exact enough)."""
    if plan.last_tokens:
        sequences, last = (torch.tensor(column) for column in zip(*plan.last_tokens))
        grad_cumulative[last] += (grad_final * finals).sum((-2, -1))[sequences]
    suffix = grad_cumulative.double().flip(0).cumsum(0).flip(0)
    suffix = torch.cat([suffix, suffix.new_zeros(1, suffix.shape[1])])
    return suffix[:-1] - suffix[plan.sequence_end]


def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                           scale: float = 1.0, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                           chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o ``[batch, seq, heads, value_dim]`` in v's dtype and, if asked, the final state ``[sequences, heads,
    key_dim, value_dim]`` (fp32; fp64 for fp64 inputs); shapes in :mod:`.naive`. Differentiable in q, k, v,
    log_decay and initial_state (a gradient of the final state included)."""
    batch, seq, heads, value_dim = v.shape
    key_heads, key_dim = q.shape[2:]
    if k.shape != q.shape or q.shape[:2] != (batch, seq) or heads % key_heads:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit: q, k are "
                         "[batch, seq, key_heads, key_dim], v [batch, seq, heads, value_dim], heads % key_heads == 0")
    if log_decay.shape not in ((heads,), (batch, seq, heads)):
        raise ValueError(f"log_decay has shape {tuple(log_decay.shape)}, expected {(heads,)} or {(batch, seq, heads)}")
    if cu_seqlens is not None and (cu_seqlens[0] != 0 or cu_seqlens[-1] != seq):
        raise ValueError(f"cu_seqlens must run from 0 to seq = {seq}, got {cu_seqlens.tolist()}")
    plan = ChunkPlan.build(batch, seq, cu_seqlens, chunk_size, heads)
    state_shape = (plan.num_sequences, heads, key_dim, value_dim)
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected {state_shape}")
    out, final = ChunkLinearAttentionFunction.apply(q, k, v, log_decay, initial_state, scale, plan)
    return out, (final if output_final_state else None)
