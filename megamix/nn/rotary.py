"""Rotary position embeddings (RoPE) in the rotate-half layout of HF Llama.

Each head vector is split into halves x = [x₁ | x₂]; pair i = (x₁[i], x₂[i]) is
rotated by the angle p·θ^(−2i/head_dim) of its position p. This is the layout HF
checkpoints are stored in, so their q/k weights load without a permutation.
"""

import torch


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each ``[seq, head_dim / 2]`` in fp32.

    positions: ``[seq]`` integer positions. Built once per forward and shared by
    every attention layer.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = torch.outer(positions.float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, seq, heads, head_dim]`` by the tables of :func:`rotary_tables`.

    [x₁ | x₂] → [x₁·cos − x₂·sin | x₂·cos + x₁·sin]
    """
    cos = cos.to(x.dtype)[:, None]  # [seq, 1, head_dim / 2]: broadcast over heads
    sin = sin.to(x.dtype)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
