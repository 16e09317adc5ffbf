"""Rotary position embeddings (RoPE) in the rotate-half layout of HF Llama.

Each head vector is split into halves x = [x₁ | x₂]; pair i = (x₁[i], x₂[i]) is
rotated by the angle p·θ^(−2i/head_dim) of its position p. This is the layout HF
checkpoints are stored in, so their q/k weights load without a permutation.
"""

import torch


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos = [cos a | cos a]`` and ``sin = [−sin a | sin a]``, each ``[*positions.shape, head_dim]`` in fp32.

    a ``[..., head_dim / 2]`` are the rotation angles of ``positions [seq]`` (or ``[batch, seq]``). The
    sign of the first half is folded into ``sin`` so that :func:`apply_rotary`
    needs no negation. Built once per forward and shared by every attention layer.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate ``x [batch, seq, heads, head_dim]`` by the tables of :func:`rotary_tables` (``[seq, head_dim]`` or
    ``[batch, seq, head_dim]``), into ``out`` if given.

    [x₁ | x₂] → [x₁·cos a − x₂·sin a | x₂·cos a + x₁·sin a] = x·cos + roll(x, head_dim/2)·sin,
    computed half by half (two multiply-adds per element, no rolled copy of x).
    The inverse rotation (the backward pass) is ``apply_rotary(grad, cos, -sin)``.
    """
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)  # broadcast over heads
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    x1, x2, y1, y2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=y1).addcmul_(x2, sin[..., :half])
    torch.mul(x2, cos[..., half:], out=y2).addcmul_(x1, sin[..., half:])
    return out
