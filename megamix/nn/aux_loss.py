"""Auxiliary losses of routed layers (MoE load balancing, router z-loss, MoH head balance).

A routed layer does not return its auxiliary loss up the call stack: it attaches the loss's
gradient to its output activations (:class:`AttachLoss`), so backward from the language-model
loss alone trains the routers, on any pipeline stage, without the schedule knowing (the approach
of Megatron-Core's ``MoEAuxLossAutoScaler``). The values are kept for the metrics.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class AttachLoss(torch.autograd.Function):
    """Identity on ``x``; backward also sends ``grad_scale`` into ``loss``, as if ``grad_scale · loss``
    had been added to the objective."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, grad_scale: float) -> torch.Tensor:
        ctx.grad_scale = grad_scale
        ctx.loss_shape = loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_full(ctx.loss_shape, ctx.grad_scale, dtype=torch.float32), None


class AuxLosses:
    """The auxiliary losses of a model's forward passes since the last :meth:`pop`.

    ``grad_scale`` weights their gradients like the language-model loss: the trainer divides
    each micro-batch's loss by the number of micro-batches, and sets the same factor here.
    """

    def __init__(self) -> None:
        self.grad_scale = 1.0
        self._values: dict[str, list[torch.Tensor]] = defaultdict(list)

    def attach(self, x: torch.Tensor, name: str, loss: torch.Tensor, coefficient: float) -> torch.Tensor:
        """Record ``loss`` (a scalar) under ``name`` and return ``x`` carrying the gradient of
        ``coefficient · loss`` (nothing is attached when the coefficient is 0 or in eval mode)."""
        self._values[name].append(loss.detach().float())
        if coefficient == 0 or not torch.is_grad_enabled():
            return x
        return AttachLoss.apply(x, coefficient * loss, self.grad_scale)

    def record(self, name: str, value: torch.Tensor) -> None:
        """Keep a statistic for the metrics only (e.g. the load imbalance of a layer)."""
        self._values[name].append(value.detach().float())

    def pop(self) -> dict[str, torch.Tensor]:
        """The mean of each recorded name over the calls since the last pop, and forget them."""
        means = {name: torch.stack(values).mean() for name, values in self._values.items()}
        self._values.clear()
        return means
