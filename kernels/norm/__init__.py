"""Fused RMSNorm, gated RMSNorm (Mamba-2) and SRMSNorm (TransNormerLLM).

Each op: a plain reference in :mod:`.naive`, a PyTorch autograd implementation in :mod:`.torch_ops`
(CPU), a Triton kernel in :mod:`.triton` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).
The three are one family (:class:`.torch_ops.NormFunction`): normalise groups of ``group_size``
consecutive channels of ``u = x · silu(z)`` (or x) by their root mean square, then scale by a
weight. x, z ``[..., dim]``, weight ``[dim]``; computed in at least fp32, returned in x's dtype.
"""

from __future__ import annotations

import torch

from megamix_kernels.norm.torch_ops import torch_norm


def norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
         group_size: int) -> torch.Tensor:
    """The family's op (z, weight optional): the Triton kernels on CUDA, :mod:`.torch_ops` elsewhere."""
    dim = x.shape[-1]
    if dim % group_size:
        raise ValueError(f"group size {group_size} does not divide dim {dim}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gate shape {tuple(z.shape)} differs from input shape {tuple(x.shape)}")
    if weight is not None and weight.shape != (dim,):
        raise ValueError(f"weight shape {tuple(weight.shape)} is not ({dim},)")
    if x.is_cuda:
        from megamix_kernels.norm.triton import triton_norm

        return triton_norm(x, z, weight, eps, group_size)
    return torch_norm(x, z, weight, eps, group_size)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x², -1) + eps) · weight, ``x [..., dim]``, ``weight [dim]``."""
    return norm(x, None, weight, eps, x.shape[-1])


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """Mamba-2's RMSNormGated (norm_before_gate=False): u = x · silu(z),
    y = u / sqrt(mean(u², group) + eps) · weight over groups of ``group_size`` consecutive channels;
    x, z ``[..., dim]`` with ``dim % group_size == 0``, ``weight [dim]``."""
    return norm(x, z, weight, eps, group_size)


def srms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """TransNormerLLM's SRMSNorm: y = x / sqrt(mean(x², -1) + eps), no weight, ``x [..., dim]``."""
    return norm(x, None, None, eps, x.shape[-1])


__all__ = ["gated_rms_norm", "rms_norm", "srms_norm"]
