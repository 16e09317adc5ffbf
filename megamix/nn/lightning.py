"""Lightning attention mixer (pattern ``L``): the TransNormerLLM token mixer.

TransNormerLLM ("Scaling TransNormer to 175 Billion Parameters", Qin et al. 2023):
linear attention with a fixed exponential decay per head, computed by the chunked
Lightning Attention-2 kernels of :mod:`megamix_kernels.linear_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megamix_kernels.linear_attention import linear_attention, step
from torch import nn

from megamix.nn.context import ForwardContext
from megamix.nn.norms import SRMSNorm
from megamix.parallel import (
    NO_TENSOR_PARALLEL,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
)
from megamix.parallel.lasp import context_linear_attention

# The kernels' default chunk, for the FLOP count only.
CHUNK_SIZE = 64


def lightning_log_decay(schedule: str, num_heads: int, layer: int, num_layers: int) -> list[float]:
    """log λ_h of heads h = 1 … num_heads (λ ∈ (0, 1], never learned: learned decays diverge).

    - ``"tnl"``: TransNormerLLM eq. 10, λ_h = exp(−(8h/H)·(1 − l/L)) for layer l = 0 … L−1, so lower
      layers forget faster and the top layers keep the longest memory;
    - ``"alibi"``: the ALiBi slopes of the Lightning Attention kernels' repository,
      λ_h = exp(−2^{−8h/H}), the same in every layer.
    """
    heads = range(1, num_heads + 1)
    if schedule == "tnl":
        return [-(8 * h / num_heads) * (1 - layer / num_layers) for h in heads]
    if schedule == "alibi":
        return [-(2 ** (-8 * h / num_heads)) for h in heads]
    raise ValueError(f"unknown Lightning decay schedule {schedule!r}; known: tnl, alibi")


def continue_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                              state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention over ``new`` tokens started from ``state``, returning the final state (generation).

    Shapes of :mod:`megamix_kernels.linear_attention` with per-token ``log_decay [batch, new, heads]`` and
    ``state [batch, heads, key_dim, value_dim]`` (fp32). A prompt chunk runs the chunked kernel; one
    decoded token runs the recurrence ``step``, which skips the kernel's chunk bookkeeping.
    """
    if q.shape[1] == 1:
        o, state = step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], state)
        return o[:, None], state
    return linear_attention(q, k, v, log_decay, initial_state=state, output_final_state=True)


class LightningAttention(nn.Module):
    """``x [batch, seq, hidden] → [batch, seq, hidden]``:

        q = swish(W_q x),  k = swish(W_k x),  v = W_v x,  u = W_u x
        o_t = Σ_{s≤t} λ_h^{t−s} (q_t · k_s) v_s       (per head, no softmax, no 1/√d)
        y = W_out (SRMSNorm(o) ⊙ u)

    SRMSNorm(o) = o / rms(o) is taken over each head's ``head_dim`` (TransNormerLLM normalises
    the concatenated heads; per head keeps tensor parallelism free of communication, as
    GroupNorm does in RetNet). ``qkvu_proj`` output is ordered [q | k | v | u], each
    ``heads · head_dim`` wide; under tensor parallelism each rank holds ``heads / tp`` heads
    of each part and their decays.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, log_decay: list[float], eps: float,
                 tp: TensorParallel = NO_TENSOR_PARALLEL):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        width = num_heads * head_dim
        self.qkvu_proj = ColumnParallelLinear(hidden_size, [width] * 4, tp)
        self.local_heads = num_heads // tp.size
        self.log_decay = log_decay[tp.rank * self.local_heads : (tp.rank + 1) * self.local_heads]
        self.norm = SRMSNorm(head_dim, eps)
        self.out_proj = RowParallelLinear(width, hidden_size, tp)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x ``[..., hidden]`` → q, k, v, u, each ``[..., local_heads, head_dim]``."""
        q, k, v, u = self.qkvu_proj(x).unflatten(-1, (4 * self.local_heads, self.head_dim)).chunk(4, dim=-2)
        return F.silu(q), F.silu(k), v, u

    def _output(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.out_proj((self.norm(o) * u).flatten(-2))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v, u = self._project(x)
        log_decay = torch.tensor(self.log_decay, device=x.device)
        o = context_linear_attention(q, k, v, log_decay, ctx.sequence)
        return self._output(o, u)

    def initial_state(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """The empty recurrent state of generation, ``[batch, local_heads, head_dim, head_dim]`` (fp32)."""
        return torch.zeros(batch, self.local_heads, self.head_dim, self.head_dim, device=device)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token ``x [batch, hidden]`` → ``[batch, hidden]`` and the next state, in constant memory:
        :meth:`extend` with one token."""
        y, state = self.extend(x[:, None], None, state, torch.ones(x.shape[0], 1, dtype=torch.bool,
                                                                          device=x.device))
        return y[:, 0], state

    def extend(self, x: torch.Tensor, ctx: ForwardContext | None, state: torch.Tensor,
               valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation: ``new`` tokens ``x [batch, new, hidden]`` → ``[batch, new, hidden]`` and the state after
        them (see :meth:`initial_state`), by the chunked kernel started from ``state``: a long prompt costs
        memory linear in its length. ``valid [batch, seen]`` ends with the new tokens' flags; a padding token
        (False) leaves the state as it is (k = 0, decay 1)."""
        q, k, v, u = self._project(x)
        real = valid[:, -x.shape[1]:, None].to(k.dtype)  # [batch, new, 1]
        log_decay = torch.tensor(self.log_decay, device=x.device) * real  # per token [batch, new, heads]
        o, state = continue_linear_attention(q, k * real[..., None], v, log_decay, state)
        return self._output(o, u), state

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of one token: projections 2·hidden·5·heads·head_dim, plus per head the
        chunk-local q kᵀ and p v (2·2·chunk·head_dim) and the state read and update (2·2·head_dim²)."""
        projections = 2 * self.hidden_size * 5 * self.num_heads * self.head_dim
        mixing = self.num_heads * (4 * min(CHUNK_SIZE, seq_len) * self.head_dim + 4 * self.head_dim**2)
        return projections + mixing

