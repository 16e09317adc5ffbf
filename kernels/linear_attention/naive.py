"""Plain PyTorch references for linear attention with decay (fp32, slow, obviously right).

The recurrence every implementation computes, per head, with state ``S [key_dim, value_dim]``:

    S_t = exp(g_t) · S_{t-1} + k_tᵀ v_t,        o_t = scale · q_t S_t,        S_{-1} = S_0 (initial state)

- Lightning attention: ``g_t = log λ_h`` constant per head, so o_t = q_t Σ_{s≤t} λ^{t−s} k_sᵀ v_s.
- Mamba-2 SSD: q = C, k = B, v = Δ·x, ``g_t = Δ_t · A_h``; B and C are shared by the heads of a group.

Shapes (the same for every implementation in this package):
q, k ``[batch, seq, key_heads, key_dim]`` with ``heads % key_heads == 0`` (head h reads key head
``h // (heads / key_heads)``); v ``[batch, seq, heads, value_dim]``; log_decay ``[heads]`` (constant)
or ``[batch, seq, heads]`` (per token), ≤ 0; initial_state ``[sequences, heads, key_dim, value_dim]``;
cu_seqlens ``[sequences + 1]`` (int, starting at 0) packs variable-length sequences along ``seq`` of a
batch of one, the state restarting at each sequence start. Returns o ``[batch, seq, heads, value_dim]``
in v's dtype and the final state ``[sequences, heads, key_dim, value_dim]`` in fp32 (or None).
"""

from __future__ import annotations

import torch


def expand_key_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[batch, seq, key_heads, dim] → [batch, seq, heads, dim]``, each key head read by heads / key_heads heads."""
    return x.repeat_interleave(heads // x.shape[2], dim=2) if x.shape[2] != heads else x


def per_token_log_decay(log_decay: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """log_decay ``[heads]`` or ``[batch, seq, heads]`` → ``[batch, seq, heads]``."""
    return log_decay.expand(batch, seq, -1) if log_decay.dim() == 1 else log_decay


def split_sequences(cu_seqlens: torch.Tensor | None, batch: int, seq: int) -> list[tuple[int, slice]]:
    """(batch row, token slice) of every sequence, in state order."""
    if cu_seqlens is None:
        return [(b, slice(0, seq)) for b in range(batch)]
    if batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into a batch of one, got batch {batch}")
    bounds = cu_seqlens.tolist()
    return [(0, slice(start, end)) for start, end in zip(bounds[:-1], bounds[1:])]


def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor,
         scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: what generation runs, in constant memory per token.

    q, k ``[batch, key_heads, key_dim]``, v ``[batch, heads, value_dim]``, log_decay ``[heads]`` or
    ``[batch, heads]``, state ``[batch, heads, key_dim, value_dim]`` (fp32)
    → o ``[batch, heads, value_dim]`` (v's dtype), the next state (fp32).
    """
    heads = v.shape[1]
    q, k = (expand_key_heads(t.unsqueeze(1), heads).squeeze(1).float() for t in (q, k))
    decay = log_decay.float().exp().expand(v.shape[0], heads)
    state = decay[..., None, None] * state + k.unsqueeze(-1) * v.float().unsqueeze(-2)
    out = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return out.to(v.dtype), state


def _sequences_and_state(q, v, initial_state, cu_seqlens):
    batch, seq, heads, value_dim = v.shape
    sequences = split_sequences(cu_seqlens, batch, seq)
    if initial_state is None:
        initial_state = q.new_zeros(len(sequences), heads, q.shape[-1], value_dim, dtype=torch.float32)
    elif initial_state.shape != (len(sequences), heads, q.shape[-1], value_dim):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected "
                         f"{(len(sequences), heads, q.shape[-1], value_dim)}")
    return sequences, initial_state


def linear_attention_recurrent(q, k, v, log_decay, scale: float = 1.0, initial_state=None,
                               output_final_state: bool = False, cu_seqlens=None):
    """Token-by-token reference: :func:`step` over each sequence (shapes in the module docstring)."""
    batch, seq, _, _ = v.shape
    sequences, initial_state = _sequences_and_state(q, v, initial_state, cu_seqlens)
    g = per_token_log_decay(log_decay, batch, seq)
    outputs, finals = [], []
    for n, (b, span) in enumerate(sequences):
        state = initial_state[n : n + 1].float()
        for t in range(span.start, span.stop):
            row = slice(b, b + 1)
            out, state = step(q[row, t], k[row, t], v[row, t], g[row, t], state, scale)
            outputs.append(out)
        finals.append(state)
    out = torch.cat(outputs).view(batch, seq, *v.shape[2:])
    return out, (torch.cat(finals) if output_final_state else None)


def linear_attention_full(q, k, v, log_decay, scale: float = 1.0, initial_state=None,
                          output_final_state: bool = False, cu_seqlens=None):
    """Full-matrix reference: for each sequence, with G_t = Σ_{u≤t} g_u (inclusive),

        O = scale · [((Q Kᵀ) ⊙ D) V + (Q ⊙ e^G) S_0],   D_ts = e^{G_t − G_s} for s ≤ t, else 0;
        S_final = e^{G_last} S_0 + Σ_s e^{G_last − G_s} k_sᵀ v_s.
    """
    batch, seq, heads, _ = v.shape
    sequences, initial_state = _sequences_and_state(q, v, initial_state, cu_seqlens)
    g = per_token_log_decay(log_decay, batch, seq).float()
    q, k = (expand_key_heads(t, heads).float() for t in (q, k))
    outputs, finals = [], []
    for n, (b, span) in enumerate(sequences):
        qs, ks, vs = (t[b, span].transpose(0, 1) for t in (q, k, v.float()))  # [heads, len, dim]
        cum = g[b, span].transpose(0, 1).cumsum(-1)  # [heads, len]
        causal = torch.ones(cum.shape[-1], cum.shape[-1], dtype=torch.bool, device=q.device).tril()
        decay = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal, float("-inf")).exp()
        s0 = initial_state[n].float()
        out = ((qs @ ks.transpose(1, 2)) * decay) @ vs + (qs * cum.exp()[..., None]) @ s0
        outputs.append(scale * out.transpose(0, 1))
        last = cum[:, -1:] if cum.shape[-1] else torch.zeros(heads, 1, device=q.device)
        tail = (last - cum).exp()[..., None]  # [heads, len, 1]
        finals.append(last.exp()[..., None] * s0 + (ks * tail).transpose(1, 2) @ vs)
    out = torch.cat(outputs, dim=0).view(batch, seq, *v.shape[2:]).to(v.dtype)
    return out, (torch.stack(finals) if output_final_state else None)
