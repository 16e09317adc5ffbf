"""Normalisation layers over the last dim of ``x [..., dim]`` (kernels in :mod:`megamix_kernels.norm`)."""

import torch
from torch import nn

from megamix_kernels.norm import gated_rms_norm, rms_norm, srms_norm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x², -1) + eps) · weight, ``x [..., dim]``, ``weight [dim]``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated norm (norm before gate off): u = x · silu(z), y = u / sqrt(mean(u², group) + eps) · weight
    over groups of ``group_size`` consecutive channels; x, z ``[..., dim]``, ``weight [dim]``.

    Under tensor parallelism each rank holds whole groups, so no group straddles ranks.
    """

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"group size {group_size} does not divide dim {dim}")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


class SRMSNorm(nn.Module):
    """TransNormerLLM's SRMSNorm: y = x / sqrt(mean(x², -1) + eps), ``x [..., dim]``; no parameters."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return srms_norm(x, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
