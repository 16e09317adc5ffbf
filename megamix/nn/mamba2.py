"""Mamba-2 mixer (pattern ``M``): the SSD state-space layer of "Transformers are SSMs" (Dao & Gu, 2024).

SSD is linear attention with a per-token decay (q = C, k = B, v = Δ·x, log-decay = Δ·A), so it runs on
the same kernels as Lightning attention, :mod:`megamix_kernels.linear_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamix.nn.context import ForwardContext
from megamix.nn.lightning import continue_linear_attention
from megamix.nn.norms import GatedRMSNorm
from megamix.parallel import (
    NO_TENSOR_PARALLEL,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    mark_split_rows,
)
from megamix.parallel.context_parallel import SequenceLayout, preceding_tokens
from megamix.parallel.lasp import context_linear_attention

# The kernels' default chunk, for the FLOP count only.
CHUNK_SIZE = 64
# Mamba-2's initial state decay rates: A = −U[1, 16] per head.
A_INIT_RANGE = (1.0, 16.0)
DT_INIT_FLOOR = 1e-4


class CausalConv1d(nn.Module):
    """Depthwise causal convolution ``x [batch, seq, channels] → [batch, seq, channels]``:
    y_t,c = bias_c + Σ_j weight_c,j · x_{t−kernel+1+j, c} (zeros before the start).

    ``weight [channels, 1, kernel]`` and ``bias [channels]``, laid out as ``nn.Conv1d(groups=channels)``
    and initialised like it (U(±1/√kernel)).
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """Over this rank's tokens of ``layout``: each chunk sees the ``kernel − 1`` tokens before it
        (from the rank holding them), and no token sees past the start of its document."""
        # the sum of kernel shifted products: on CPU several times faster, backward included, than
        # the oneDNN depthwise convolution (whose backward is slowest on the [batch, seq, channels] layout)
        batch, seq, channels = x.shape
        width = self.kernel - 1
        if layout.is_trivial:
            padded = F.pad(x, (0, 0, width, 0))
        else:
            chunks, seq = len(layout.chunks), layout.chunk_len
            before = preceding_tokens(x, layout, width)
            padded = torch.cat([before, x.view(batch, chunks, seq, channels)], dim=2).flatten(0, 1)
        weight = self.weight.squeeze(1).to(x.dtype)
        y = self.bias.to(x.dtype) + padded[:, width:] * weight[:, width]
        for shift in range(1, self.kernel):
            earlier = padded[:, width - shift : width - shift + seq]
            same_document = layout.same_document(shift)
            if same_document is not None:
                earlier = earlier * same_document.view(earlier.shape[0], seq, 1).to(x.dtype)
            y = torch.addcmul(y, earlier, weight[:, width - shift])
        return y.view(batch, -1, channels)

    def extend(self, x: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``new`` tokens ``x [batch, new, channels]`` after the previous ``kernel − 1`` inputs ``window
        [batch, channels, kernel − 1]`` → the outputs ``[batch, new, channels]`` and the next window."""
        full = torch.cat([window.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [batch, channels, kernel − 1 + new]
        y = F.conv1d(full, self.weight.to(x.dtype), self.bias.to(x.dtype), groups=full.shape[1])
        return y.transpose(1, 2), full[..., full.shape[-1] - (self.kernel - 1):]

    def initial_value(self, name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        bound = 1 / math.sqrt(self.kernel)
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Mamba2Mixer(nn.Module):
    """``x [batch, seq, hidden] → [batch, seq, hidden]``, with H heads of P channels (d_inner = H·P),
    G groups sharing B and C, state size N:

        [z | x | B | C | Δ] = W_in x                          (widths d_inner, d_inner, G·N, G·N, H)
        [x | B | C] = SiLU(conv1d([x | B | C]))              (depthwise, causal)
        Δ = softplus(Δ + dt_bias),  A = −exp(A_log)          (per head)
        h_t = exp(Δ_t A) h_{t−1} + B_t (Δ_t x_t)ᵀ,  y_t = C_t h_t + D x_t     (per head, h [N, P])
        out = W_out GatedRMSNorm(y, z)                       (norm(y · SiLU(z)) per group of d_inner / G)

    Tensor parallel as Megatron-Core: each rank holds H/tp heads and G/tp whole groups — its
    slices of every part of W_in, of the conv channels, dt_bias, A_log, D and the norm — so
    the SSM needs no communication; W_out is row-parallel.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, state_size: int, num_groups: int,
                 conv_kernel: int, dt_range: tuple[float, float], eps: float,
                 tp: TensorParallel = NO_TENSOR_PARALLEL, dt_floor: float = 0.0):
        super().__init__()
        if num_heads % num_groups or num_groups % tp.size:
            raise ValueError(f"Mamba-2 needs heads ({num_heads}) divisible by groups ({num_groups}) "
                             f"and groups divisible by tensor-parallel ranks ({tp.size})")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.state_size, self.num_groups, self.dt_range = state_size, num_groups, dt_range
        self.dt_floor = dt_floor
        d_inner = num_heads * head_dim
        conv_parts = [d_inner, num_groups * state_size, num_groups * state_size]
        self.in_proj = ColumnParallelLinear(hidden_size, [d_inner, *conv_parts, num_heads], tp)
        self.local_parts = self.in_proj.local_parts  # z, x, B, C, Δ widths on this rank
        self.local_heads, self.local_groups = num_heads // tp.size, num_groups // tp.size
        self.conv1d = CausalConv1d(sum(self.local_parts[1:4]), conv_kernel)
        mark_split_rows(self.conv1d.weight, conv_parts, tp)
        mark_split_rows(self.conv1d.bias, conv_parts, tp)
        self.dt_bias = nn.Parameter(torch.empty(self.local_heads))
        self.A_log = nn.Parameter(torch.empty(self.local_heads))
        self.D = nn.Parameter(torch.empty(self.local_heads))
        for param in (self.dt_bias, self.A_log, self.D):
            mark_split_rows(param, [num_heads], tp)
        self.norm = GatedRMSNorm(d_inner // tp.size, d_inner // num_groups, eps)
        mark_split_rows(self.norm.weight, [d_inner], tp)
        self.out_proj = RowParallelLinear(d_inner, hidden_size, tp)

    def _ssm_inputs(self, xbc: torch.Tensor, dt: torch.Tensor):
        """Split the convolved ``[x | B | C] [..., channels]`` and raw ``Δ [..., local_heads]`` into
        x ``[..., heads, P]``, B and C ``[..., groups, N]``, Δ ``[..., heads]`` and log-decay Δ·A."""
        x, b, c = xbc.split(self.local_parts[1:4], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        if self.dt_floor > 0:  # as Nemotron-H: the step never goes below the floor
            dt = dt.clamp(min=self.dt_floor)
        x = x.unflatten(-1, (self.local_heads, self.head_dim))
        b, c = (t.unflatten(-1, (self.local_groups, self.state_size)) for t in (b, c))
        return x, b, c, dt, dt * -torch.exp(self.A_log.float())

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y + x * self.D[:, None].to(x.dtype)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _project_in(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden [..., hidden]`` → z ``[..., d_inner]``, the conv input [x | B | C] and the raw Δ ``[..., heads]``."""
        return self.in_proj(hidden).split([self.local_parts[0], sum(self.local_parts[1:4]), self.local_parts[4]],
                                          dim=-1)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        z, xbc, dt = self._project_in(hidden)
        x, b, c, dt, log_decay = self._ssm_inputs(F.silu(self.conv1d(xbc, ctx.sequence)), dt)
        y = context_linear_attention(c, b, x * dt.unsqueeze(-1).to(x.dtype), log_decay, ctx.sequence)
        return self._output(y, x, z)

    def initial_state(self, batch: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty generation state: the conv window ``[batch, channels, kernel − 1]`` and the SSM state
        ``[batch, local_heads, N, P]`` (fp32)."""
        channels = self.conv1d.weight.shape[0]
        return (torch.zeros(batch, channels, self.conv1d.kernel - 1, device=device),
                torch.zeros(batch, self.local_heads, self.state_size, self.head_dim, device=device))

    def step(self, hidden: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One token ``hidden [batch, hidden]`` → ``[batch, hidden]`` and the next state, in constant memory:
        :meth:`extend` with one token."""
        y, state = self.extend(hidden[:, None], None, state, torch.ones(hidden.shape[0], 1, dtype=torch.bool,
                                                                          device=hidden.device))
        return y[:, 0], state

    def extend(self, hidden: torch.Tensor, ctx: ForwardContext | None, state: tuple[torch.Tensor, torch.Tensor],
               valid: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Generation: ``new`` tokens ``hidden [batch, new, hidden]`` → ``[batch, new, hidden]`` and the state
        after them (see :meth:`initial_state`): the convolution continues from the window, SSD runs the
        chunked kernel from the SSM state, so a long prompt costs memory linear in its length. ``valid
        [batch, seen]`` ends with the new tokens' flags; a padding token (False) enters the convolution as
        zeros (as before a sequence start) and leaves the SSM state as it is (Δ·x = 0, decay 1)."""
        window, ssm_state = state
        real = valid[:, -hidden.shape[1]:, None]  # [batch, new, 1]
        z, xbc, dt = self._project_in(hidden)
        xbc, window = self.conv1d.extend(xbc * real.to(xbc.dtype), window)
        x, b, c, dt, log_decay = self._ssm_inputs(F.silu(xbc), dt)
        dt, log_decay = dt * real.to(dt.dtype), log_decay * real
        y, ssm_state = continue_linear_attention(c, b, x * dt.unsqueeze(-1).to(x.dtype), log_decay, ssm_state)
        return self._output(y, x, z), (window, ssm_state)

    def initial_value(self, name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor | None:
        """Mamba-2's initialisation of the per-head parameters (others: the model default).

        dt_bias = softplus⁻¹(Δ₀) with Δ₀ log-uniform in dt_range (at least 1e-4), so the initial
        step sizes span it; A_log = log U[1, 16]; D = 1.
        """
        if name == "dt_bias":
            low, high = (math.log(v) for v in self.dt_range)
            dt = torch.empty(shape).uniform_(low, high, generator=generator).exp().clamp(min=DT_INIT_FLOOR)
            return dt + torch.log(-torch.expm1(-dt))
        if name == "A_log":
            return torch.empty(shape).uniform_(*A_INIT_RANGE, generator=generator).log()
        if name == "D":
            return torch.ones(shape)
        return None

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of one token: the projections, the conv, and SSD — per group the chunk-local
        C Bᵀ (2·chunk·N), per head its product with x (2·chunk·P) and the state read and update (2·2·N·P)."""
        d_inner, groups_n = self.num_heads * self.head_dim, self.num_groups * self.state_size
        projections = 2 * self.hidden_size * (2 * d_inner + 2 * groups_n + self.num_heads) + 2 * d_inner * self.hidden_size
        conv = 2 * self.conv1d.kernel * (d_inner + 2 * groups_n)
        chunk = min(CHUNK_SIZE, seq_len)
        ssd = 2 * chunk * groups_n + self.num_heads * (2 * chunk * self.head_dim + 4 * self.state_size * self.head_dim)
        return projections + conv + ssd
