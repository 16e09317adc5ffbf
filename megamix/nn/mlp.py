"""Dense MLP mixer (pattern ``-``): gated (SwiGLU, SGLU) or squared-ReLU."""

import torch
import torch.nn.functional as F
from torch import nn

from megamix.nn.context import ForwardContext
from megamix.parallel import NO_TENSOR_PARALLEL, ColumnParallelLinear, RowParallelLinear, TensorParallel


class SiluGateFunction(torch.autograd.Function):
    """``[gate | up] [..., 2·ffn] → silu(gate) ⊙ up [..., ffn]``.

    Backward writes d_gate and d_up straight into the two halves of one gradient
    buffer, where autograd through ``chunk`` would concatenate them in a further pass,
    and computes d_gate = silu'(gate) · (grad ⊙ up) in place there.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        ctx.save_for_backward(gate, up, silu_gate)
        return silu_gate * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate, up, silu_gate = ctx.saved_tensors
        grad_gate_up = grad.new_empty(*grad.shape[:-1], 2 * grad.shape[-1])
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, silu_gate, out=grad_up)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_gate_up


def mlp_activation(kind: str, projected: torch.Tensor) -> torch.Tensor:
    """The MLP's nonlinearity on its input projection: ``[gate | up] [..., 2·ffn]`` for the gated kinds
    (``swiglu``: silu(gate) ⊙ up; ``sglu``: gate ⊙ up), ``up [..., ffn]`` for ``relu2`` (relu(up)²) → ``[..., ffn]``."""
    if kind == "relu2":
        return F.relu(projected).square()
    if kind == "swiglu":
        return SiluGateFunction.apply(projected)
    gate, up = projected.chunk(2, dim=-1)
    return gate * up


# Weight matrices of ffn_hidden_size × hidden_size per MLP kind
MLP_MATRICES = {"swiglu": 3, "sglu": 3, "relu2": 2}


class GatedMLP(nn.Module):
    """The dense MLP of ``-`` layers, ``x [batch, seq, hidden] → [batch, seq, hidden]``, by ``kind``:

    - ``"swiglu"`` (Llama): y = W_down (silu(W_gate x) ⊙ W_up x);
    - ``"sglu"`` (the simple GLU channel mixer of TransNormerLLM): y = W_down (W_gate x ⊙ W_up x);
    - ``"relu2"`` (Nemotron-H, Primer's squared ReLU), not gated: y = W_down relu(W_up x)².

    The gated kinds hold W_gate and W_up stacked as ``[gate | up]`` along the output dim
    of ``gate_up_proj``: one matmul instead of two. ``relu2`` holds ``up_proj`` alone.
    Under tensor parallelism each rank holds ``ffn_hidden_size / tp`` of every part (a
    column-parallel linear) and the matching columns of ``down_proj`` (row-parallel).
    """

    KINDS = ("swiglu", "sglu", "relu2")

    def __init__(self, hidden_size: int, ffn_hidden_size: int, tp: TensorParallel = NO_TENSOR_PARALLEL,
                 kind: str = "swiglu"):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown MLP kind {kind!r}; known: {', '.join(self.KINDS)}")
        self.kind = kind
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        if kind == "relu2":
            self.up_proj = ColumnParallelLinear(hidden_size, [ffn_hidden_size], tp)
        else:
            self.gate_up_proj = ColumnParallelLinear(hidden_size, [ffn_hidden_size, ffn_hidden_size], tp)
        self.down_proj = RowParallelLinear(ffn_hidden_size, hidden_size, tp)

    @property
    def in_proj(self) -> ColumnParallelLinear:
        """The input projection: ``gate_up_proj`` (gated kinds) or ``up_proj`` (relu2)."""
        return self.up_proj if self.kind == "relu2" else self.gate_up_proj

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(mlp_activation(self.kind, self.in_proj(x)))

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of one token: 2 per multiply-add of the weight matrices (:data:`MLP_MATRICES`)."""
        return 2 * MLP_MATRICES[self.kind] * self.hidden_size * self.ffn_hidden_size
