"""The norm family in PyTorch with a hand-written backward (the CPU implementation).

Autograd through the composite ``F.rms_norm`` makes about twice as many passes over x on CPU
as the backward written out here.
"""

from __future__ import annotations

import torch


class NormFunction(torch.autograd.Function):
    """y = û · w over groups of ``group_size`` consecutive channels of ``x [..., dim]``:

        u = x · silu(z)  (x without a gate),   rstd = 1 / sqrt(mean(u², group) + eps),   û = u · rstd.

    RMSNorm is one group with a weight, SRMSNorm one group without (z and weight may be None).
    Backward, with ĝ = g · w (g without a weight):

        du = rstd · (ĝ − û · mean(ĝ · û, group)),   dw = Σ_rows g · û,
        dx = du · silu(z),   dz = du · x · σ(z) · (1 + z · (1 − σ(z))).

    Computed in at least fp32 (the mean of squares of bf16 values loses too many bits) and
    returned in the inputs' dtypes; saves only x, z, weight and rstd ``[..., dim / group_size, 1]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                group_size: int) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        u = gated_input(x, z, group_size, compute)
        rstd = torch.rsqrt(torch.linalg.vector_norm(u, dim=-1, keepdim=True).square() / group_size + eps)
        y = u * rstd
        if weight is not None:
            y.mul_(weight.to(compute).view(-1, group_size))
        ctx.save_for_backward(x, z, weight, rstd)
        ctx.group_size = group_size
        return y.flatten(-2).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, z, weight, rstd = ctx.saved_tensors
        group_size = ctx.group_size
        compute = rstd.dtype
        u_hat = gated_input(x, z, group_size, compute) * rstd
        grad = grad.to(compute).unflatten(-1, (-1, group_size))
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = (grad * u_hat).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        grad_u_hat = grad if weight is None else grad * weight.to(compute).view(-1, group_size)
        mean_dot = torch.linalg.vecdot(grad_u_hat, u_hat).unsqueeze(-1) / group_size
        # written over û's buffer (ĝ may be the caller's gradient): fewer passes and allocations
        grad_u = torch.sub(grad_u_hat, u_hat.mul_(mean_dot), out=u_hat).mul_(rstd).flatten(-2)
        if z is None:
            return grad_u.to(x.dtype), None, grad_weight, None, None
        z_compute = z.to(compute)
        sigmoid_z = torch.sigmoid(z_compute)
        grad_x = (grad_u * z_compute * sigmoid_z).to(x.dtype)
        grad_z = None
        if ctx.needs_input_grad[1]:
            grad_z = (grad_u * x.to(compute) * sigmoid_z * (1 + z_compute * (1 - sigmoid_z))).to(z.dtype)
        return grad_x, grad_z, grad_weight, None, None


def gated_input(x: torch.Tensor, z: torch.Tensor | None, group_size: int, compute: torch.dtype) -> torch.Tensor:
    """u = x · silu(z) (x without a gate) in the compute dtype,
    ``[..., dim] → [..., dim / group_size, group_size]``."""
    u = x.to(compute) if z is None else x.to(compute) * torch.nn.functional.silu(z.to(compute))
    return u.unflatten(-1, (-1, group_size))


def torch_norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
               group_size: int) -> torch.Tensor:
    """The norm family of :class:`NormFunction` (z, weight optional), ``x [..., dim] → [..., dim]``."""
    return NormFunction.apply(x, z, weight, eps, group_size)
