"""Linear attention with decay: S_t = e^{g_t} S_{t−1} + k_tᵀ v_t, o_t = scale · q_t S_t.

One op serves Lightning attention (``log_decay [heads]``, constant per head) and Mamba-2 SSD
(``log_decay [batch, seq, heads]``, per token); shapes are in :mod:`.naive`.

- :mod:`.naive`: token-by-token recurrence and full-matrix references, and the one-token ``step``;
- :mod:`.chunk`: the chunked PyTorch implementation (CPU);
- :mod:`.triton`: the chunked Triton kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from megamix_kernels.linear_attention.chunk import chunk_linear_attention
from megamix_kernels.linear_attention.naive import (
    linear_attention_full,
    linear_attention_recurrent,
    step,
)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                     scale: float = 1.0, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None):
    """o ``[batch, seq, heads, value_dim]`` and the final state (or None): the Triton kernels on CUDA,
    the chunked PyTorch implementation elsewhere."""
    if q.is_cuda:
        from megamix_kernels.linear_attention.triton import triton_linear_attention

        return triton_linear_attention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_linear_attention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


__all__ = [
    "chunk_linear_attention",
    "linear_attention",
    "linear_attention_full",
    "linear_attention_recurrent",
    "step",
]
