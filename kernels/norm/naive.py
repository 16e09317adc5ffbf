"""Plain PyTorch references for the norms (autograd gives their gradients).

Shapes (the same for every implementation in this package): x, z ``[..., dim]``, weight ``[dim]``;
the result has x's shape and dtype and is computed in at least fp32.
"""

import torch
import torch.nn.functional as F


def srms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x², -1) + eps) (TransNormerLLM's SRMSNorm: no weight)."""
    x_compute = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x_compute * torch.rsqrt(x_compute.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x², -1) + eps) · weight."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return (srms_norm(x.to(compute), eps) * weight.to(compute)).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """Mamba-2's RMSNormGated (norm_before_gate=False): u = x · silu(z), then each group of
    ``group_size`` consecutive channels is divided by sqrt(mean(u², group) + eps); y = that · weight."""
    compute = torch.promote_types(x.dtype, torch.float32)
    u = x.to(compute) * F.silu(z.to(compute))
    normalized = srms_norm(u.unflatten(-1, (-1, group_size)), eps).flatten(-2)
    return (normalized * weight.to(compute)).to(x.dtype)
