"""Linear-time mixers under context parallelism and packed documents (LASP-2 style).

Linear attention with decay carries a fixed-size state ``S [key_dim, value_dim]`` per head from token
to token (:mod:`megamix_kernels.linear_attention`). A rank's chunk g of a sample therefore needs only
the state entering it, ``H_g``. With ``S_g`` the state chunk g produces from a zero start and
``a_g = exp(Σ_{t∈g} log_decay_t)`` its total decay (0 when a document starts inside it):

    H_0 = 0,    H_{g+1} = a_g · H_g + S_g,
    o_t = o_t^local + scale · [no document start in the chunk up to t] · e^{G_t} · q_t H_g,

G_t the decay accumulated from the chunk start to t (inclusive). Each rank runs the kernel on its
chunks with zero initial states (o^local, S_g), all-gathers (S_g, a_g) once — a payload whose size
does not depend on the sequence length — and combines the prefix locally. The backward mirrors it
through autograd: the gradients of the gathered states are reduce-scattered back to their chunks.
"""

from __future__ import annotations

import torch
from megamix_kernels.linear_attention import linear_attention

from megamix.parallel.comm import gather_parts
from megamix.parallel.context_parallel import SequenceLayout


def _piece_bounds(starts: torch.Tensor, chunk_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens of the pieces of the flattened ``[batch · local_seq]`` tokens — cut at every chunk start and
    every document start (``starts [batch, local_seq]``) — and the index of each chunk's last piece
    ``[batch · chunks]``."""
    cuts = starts.clone()
    cuts[:, ::chunk_len] = True
    flat = cuts.flatten()
    begins = flat.nonzero().squeeze(1)
    cu_seqlens = torch.cat([begins, begins.new_tensor([flat.numel()])]).to(torch.int32)
    pieces_per_chunk = cuts.view(-1, chunk_len).sum(dim=1)
    return cu_seqlens, pieces_per_chunk.cumsum(0) - 1


def context_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                             layout: SequenceLayout, scale: float = 1.0) -> torch.Tensor:
    """Linear attention with decay over this rank's tokens in ``layout`` → o ``[batch, local_seq, heads, value_dim]``.

    q, k ``[batch, local_seq, key_heads, key_dim]``, v ``[batch, local_seq, heads, value_dim]``, log_decay
    ``[heads]`` or ``[batch, local_seq, heads]`` (shapes of :mod:`megamix_kernels.linear_attention`). The state
    restarts at every document start; under context parallelism it flows in from the ranks holding the
    earlier chunks, as in the module docstring.
    """
    batch, local_seq, heads, value_dim = v.shape
    key_dim = q.shape[3]
    chunks, chunk_len = len(layout.chunks), layout.chunk_len
    parallel = layout.group.size > 1
    if layout.is_trivial:
        return linear_attention(q, k, v, log_decay, scale)[0]

    if layout.documents is None:  # each chunk is one sequence of the kernel's batch
        def by_chunk(x):
            return x.reshape(batch * chunks, chunk_len, *x.shape[2:])

        out, finals = linear_attention(by_chunk(q), by_chunk(k), by_chunk(v),
                                       log_decay if log_decay.dim() == 1 else by_chunk(log_decay),
                                       scale, output_final_state=parallel)
    else:  # each piece between chunk and document starts is one sequence of a packed batch of one
        cu_seqlens, last_piece = _piece_bounds(layout.segment_starts(), chunk_len)

        def packed(x):
            return x.reshape(1, batch * local_seq, *x.shape[2:])

        out, finals = linear_attention(packed(q), packed(k), packed(v),
                                       log_decay if log_decay.dim() == 1 else packed(log_decay),
                                       scale, output_final_state=parallel, cu_seqlens=cu_seqlens)
        if parallel:
            finals = finals[last_piece]
    out = out.view(batch, local_seq, heads, value_dim)
    if not parallel:
        return out
    incoming = _incoming_state_output(q, log_decay, finals.view(batch, chunks, heads, key_dim, value_dim), layout)
    return out + (scale * incoming).to(out.dtype)


def _incoming_state_output(q: torch.Tensor, log_decay: torch.Tensor, chunk_states: torch.Tensor,
                           layout: SequenceLayout) -> torch.Tensor:
    """[no document start up to t] · e^{G_t} · q_t H_g for every local token (module docstring), from
    this rank's zero-start chunk states ``[batch, chunks, heads, key_dim, value_dim]``, in fp32 without the scale."""
    batch, local_seq, key_heads, key_dim = q.shape
    _, chunks, heads, _, value_dim = chunk_states.shape
    chunk_len = layout.chunk_len
    g = log_decay.float().expand(batch, local_seq, heads).reshape(batch, chunks, chunk_len, heads)
    cumulative = g.cumsum(dim=2)
    starts = layout.segment_starts().expand(batch, local_seq).reshape(batch, chunks, chunk_len)
    # a_g as a log: the chunk's total decay, −inf when a document starts in it (the state does not pass)
    log_carry = cumulative[:, :, -1].masked_fill(starts.any(dim=2, keepdim=True), float("-inf"))

    gathered = gather_parts(torch.cat([chunk_states.flatten(3), log_carry.unsqueeze(-1)], dim=-1).unsqueeze(0),
                            layout.group)  # [cp, batch, chunks, heads, key_dim · value_dim + 1]
    states = gathered[..., :-1].unflatten(-1, (key_dim, value_dim))
    carries = gathered[..., -1].exp()
    incoming = [torch.zeros_like(chunk_states[:, 0])]
    for chunk in range(max(layout.chunks)):
        rank, slot = layout.owner(chunk)
        incoming.append(carries[rank, :, slot, :, None, None] * incoming[-1] + states[rank, :, slot])
    entering = torch.stack([incoming[chunk] for chunk in layout.chunks], dim=1)  # [batch, chunks, heads, K, V]

    reaches = starts.cumsum(dim=2) == 0  # no document start in the chunk up to t
    weight = cumulative.exp() * reaches.unsqueeze(-1)  # [batch, chunks, chunk_len, heads]
    q_heads = q.float().reshape(batch, chunks, chunk_len, key_heads, 1, key_dim)
    q_heads = q_heads.expand(-1, -1, -1, -1, heads // key_heads, -1).reshape(batch, chunks, chunk_len, heads, key_dim)
    extra = torch.einsum("bclhk,bchkv->bclhv", q_heads * weight.unsqueeze(-1), entering)
    return extra.reshape(batch, local_seq, heads, value_dim)
