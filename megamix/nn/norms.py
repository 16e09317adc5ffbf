"""Normalisation layers."""

import torch
from torch import nn


class RMSNormFunction(torch.autograd.Function):
    """y = x̂ · w with x̂ = x · rstd, rstd = 1 / sqrt(mean(x², -1) + eps), over ``x [..., dim]``.

    Backward: dx = rstd · (g·w − x̂ · mean(g·w·x̂, -1)), dw = Σ g·x̂ over all rows.
    Written out because autograd through the composite ``F.rms_norm`` makes about
    twice as many passes over x on CPU. Computed in at least fp32 (the mean of
    squares of bf16 values loses too many bits) and returned in x's dtype; only x
    and rstd are saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        x_compute = x.to(compute)
        rstd = torch.rsqrt(torch.linalg.vector_norm(x_compute, dim=-1, keepdim=True).square() / x.shape[-1] + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x_compute * rstd * weight.to(compute)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.to(rstd.dtype) * rstd
        grad = grad.to(rstd.dtype)
        grad_x_hat = grad * weight.to(rstd.dtype)
        mean_dot = torch.linalg.vecdot(grad_x_hat, x_hat).unsqueeze(-1) / x.shape[-1]
        grad_x = (grad_x_hat - x_hat * mean_dot) * rstd
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x², -1) + eps) · weight, ``x [..., dim]`` (see :class:`RMSNormFunction`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
