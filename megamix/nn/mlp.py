"""Dense MLP mixer (pattern ``-``)."""

import torch
import torch.nn.functional as F
from torch import nn

from megamix.nn.context import ForwardContext


class SwiGLU(nn.Module):
    """y = W_down (silu(W_gate x) ⊙ W_up x), ``x [batch, seq, hidden] → [batch, seq, hidden]``.

    ``gate_up_proj`` holds W_gate and W_up stacked as ``[gate | up]`` along its
    output dim: one matmul instead of two, and the shape a column-parallel
    linear with two logical output parts needs.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of one token: 2 per multiply-add of the three weight matrices."""
        return 2 * 3 * self.hidden_size * self.ffn_hidden_size
