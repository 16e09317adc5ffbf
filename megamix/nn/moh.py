"""Mixture-of-head attention mixer (pattern ``H``).

"MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin et al. 2024): multi-head
attention is a sum over heads, W_out · concat(headᵢ) = Σᵢ W_outⁱ headᵢ; MoH makes it a
weighted sum Σᵢ gᵢ W_outⁱ headᵢ in which every token uses its ``shared`` heads and the
``top_k`` of the other (routed) heads that a router picks for it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamix.errors import ConfigError
from megamix.nn.attention import Attention, KVCache, attention, causal_attention
from megamix.nn.context import ForwardContext
from megamix.parallel import (
    NO_TENSOR_PARALLEL,
    TensorParallel,
    mark_replicated_partial_grads,
)
from megamix.parallel.context_parallel import SequenceLayout
from megamix.parallel.tensor_parallel import tp_input

# The routed heads' attention is computed only for the query rows their tokens selected
# (padded to the busiest head) when that is at most this fraction of the sequence; above it,
# one dense causal call over all heads is faster. The gathered rows see all keys through a
# mask, where the causal kernel skips the upper half: measured on CPU (T = 1024, 8 heads of 64),
# the layer ran ~5% faster gathered at 0.37 of the rows and ~10% slower at 0.53.
GATHER_MAX_FRACTION = 0.4


def gathered_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Causal attention of the query rows ``rows`` of each head only.

    q, k, v ``[batch, seq, heads, head_dim]`` (one kv head per query head), ``rows [batch, heads, n]``
    distinct positions per head → ``[batch, seq, heads, head_dim]``: at (t, h) for t in rows[:, h]
    softmax(q_t kᵀ / √head_dim, keys s ≤ t) v, zero elsewhere. The products cost n / seq of a
    non-causal call over all rows, 2n / seq of a causal one (the mask hides keys, it skips none).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
    index = rows[..., None].expand(-1, -1, -1, q.shape[-1])
    future = torch.arange(q.shape[2], device=q.device) > rows[..., None]  # [batch, heads, n, seq]
    # an additive mask: SDPA would convert a boolean one anew in forward and in backward
    mask = q.new_zeros(future.shape).masked_fill_(future, -math.inf)
    out = F.scaled_dot_product_attention(q.gather(2, index), k, v, attn_mask=mask)
    return torch.zeros_like(q).scatter(2, index, out).transpose(1, 2)


class MoHAttention(Attention):
    """Causal GQA attention whose heads are mixed per token by a router.

    ``x [batch, seq, hidden] → [batch, seq, hidden]``. With s = ``shared_heads`` shared heads, the
    r = heads − s routed ones, router logits [a | b | c] = W_router x (s, r and 2 wide, fp32):

        [α_shared, α_routed] = softmax(c)                      (the two-stage balance)
        g_i = α_shared · softmax(a)_i                          shared head i
        g_j = α_routed · p_j / Σ_{j' ∈ topk(p)} p_j'           routed head j ∈ topk(p), p = softmax(b)
        g_j = 0                                                other routed heads
        y = W_out · concat(g_i · head_i)

    The heads, their q/k/v/out weights and rotary embeddings are those of :class:`Attention`
    (same parameter names), plus ``router.weight [heads + 2, hidden]`` with rows [a | b | c].
    A token still provides keys and values to every head; only its query rows in heads it did
    not select are skipped (see :func:`gathered_causal_attention`).

    Load balance (Switch Transformer, over the routed heads and all tokens of the micro-batch):
    L = r · Σ_j f_j P_j, f_j = the fraction of the tokens' top-k choices that went to head j,
    P_j = the mean of p_j; L = 1 when the routing is uniform. ``aux_loss_coeff · L`` is added
    to the objective through ``ctx.aux`` (as ``moh_aux_loss``); ``moh_active_heads`` records
    the fraction of heads each token uses, (s + top_k) / heads.

    Head layout: the heads form G = gcd(s, r) groups of consecutive heads, each group s/G shared
    heads followed by r/G routed ones (s = 2, r = 6: S R R R S R R R); router columns a and b
    list the shared and the routed heads in that order. The layout does not depend on the
    parallel layout, so checkpoints move between layouts. Under tensor parallelism (tp dividing
    s and r, hence G) each rank holds heads / tp consecutive heads, i.e. G / tp whole groups:
    its share of both kinds. The router is replicated and reads the full-sequence input that the
    qkv projection reads (one gather under SP); every rank computes all gates and scales its own
    heads: forward and backward issue exactly the collectives of :class:`Attention`. The router's
    gradient on a rank covers only that rank's heads, so it is marked to be summed over the TP
    group (by the optimizer, as the norms' are under SP); each rank attaches the identical
    load-balance loss with 1/tp of the coefficient, so the sum counts it once.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, shared_heads: int,
                 routed_top_k: int, aux_loss_coeff: float, name: str, tp: TensorParallel = NO_TENSOR_PARALLEL):
        routed_heads = num_heads - shared_heads
        if not 0 < shared_heads < num_heads:
            raise ConfigError(f"{name}: MoH needs 1 <= shared_heads < num_heads ({num_heads}), got {shared_heads}")
        if not 0 < routed_top_k <= routed_heads:
            raise ConfigError(f"{name}: MoH needs 1 <= routed_top_k <= the {routed_heads} routed heads, "
                              f"got {routed_top_k}")
        if shared_heads % tp.size or routed_heads % tp.size:
            raise ConfigError(f"{name}: the {shared_heads} shared and {routed_heads} routed MoH heads must each be "
                              f"divisible by the tensor-parallel size {tp.size}, so each rank holds its share of both")
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, tp)
        self.name = name
        self.shared_heads, self.routed_heads, self.top_k = shared_heads, routed_heads, routed_top_k
        self.aux_loss_coeff = aux_loss_coeff
        groups = math.gcd(shared_heads, routed_heads)
        self.local_groups = groups // tp.size
        self.shared_per_group = shared_heads // groups
        self.router = nn.Linear(hidden_size, num_heads + 2, bias=False)
        mark_replicated_partial_grads(self.router.weight, tp)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = tp_input(x, self.tp)  # shared by the router and the qkv projection
        gates, balance_loss = self.route(x, ctx.sequence)
        ctx.aux.record("moh_active_heads", torch.tensor((self.shared_heads + self.top_k) / self.num_heads))
        heads = self.attend(*self.project_in(x, ctx), gates, ctx)
        # gates first: the product then takes their token-major layout, which flattens without a copy
        y = self.project_out(gates[..., None].to(heads.dtype) * heads)
        return ctx.aux.attach(y, "moh_aux_loss", balance_loss, self.aux_loss_coeff / self.tp.size)

    def extend(self, x: torch.Tensor, ctx: ForwardContext, state: KVCache,
               valid: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Generation (see :meth:`Attention.extend`): every head attends over the cache, then the gates mix them."""
        x = tp_input(x, self.tp)
        gates, _ = self.route(x)
        heads, state = self.attend_cached(x, ctx, state, valid)
        return self.project_out(gates[..., None].to(heads.dtype) * heads), state

    def route(self, x: torch.Tensor, sequence: SequenceLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [batch, seq, hidden]`` → this rank's gates g ``[batch, seq, local heads]`` (fp32, in head
        order) and the load-balance loss L (see the class docstring for both). Under context parallelism
        (``sequence``; None: each row is a whole sample) L is over the whole sequences: its value sums the
        cp ranks' shares, its gradient is this rank's share."""
        sequence = sequence or SequenceLayout(x.shape[1])
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32
            logits = F.linear(x.float(), self.router.weight.float())
        shared_logits, routed_logits, balance_logits = logits.split([self.shared_heads, self.routed_heads, 2], dim=-1)
        alpha_shared, alpha_routed = balance_logits.softmax(dim=-1).split(1, dim=-1)
        p = routed_logits.softmax(dim=-1)
        chosen = torch.zeros_like(p).scatter(-1, p.topk(self.top_k, dim=-1).indices, 1.0)
        kept = p * chosen
        shared = alpha_shared * shared_logits.softmax(dim=-1)
        routed = alpha_routed * kept / kept.sum(dim=-1, keepdim=True)
        tokens = x.shape[0] * x.shape[1] * sequence.group.size
        fraction = sequence.sum_over_ranks(chosen.sum(dim=(0, 1))) / (tokens * self.top_k)
        share = self.routed_heads * (fraction * p.sum(dim=(0, 1)) / tokens).sum()
        balance_loss = sequence.total_of_shares(share)
        return self.in_head_order(self.local_share(shared), self.local_share(routed)), balance_loss

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor,
               ctx: ForwardContext) -> torch.Tensor:
        """Head outputs ``[batch, seq, local heads, head_dim]`` (before gating) wherever the gate is not 0.

        When every routed head was selected by at most ``GATHER_MAX_FRACTION`` of the tokens, the
        shared heads run dense and the routed heads only over their selected query rows (padded
        with unselected ones up to the busiest head's count), so heads no token selected cost
        only padding; otherwise, and for packed documents or context parallelism, all heads run
        in one dense causal call.
        """
        _, routed_gates = self.by_role(gates)
        rows = int((routed_gates > 0).sum(dim=1).max())
        if rows > GATHER_MAX_FRACTION * q.shape[1] or not ctx.sequence.is_trivial:
            return attention(q, k, v, ctx.sequence)
        per_kv = q.shape[2] // k.shape[2]
        (q_shared, q_routed), (k_shared, k_routed), (v_shared, v_routed) = (
            self.by_role(t) for t in (q, k.repeat_interleave(per_kv, dim=2), v.repeat_interleave(per_kv, dim=2)))
        selected = routed_gates.topk(rows, dim=1).indices.transpose(1, 2)  # [batch, routed heads, rows]
        return self.in_head_order(causal_attention(q_shared, k_shared, v_shared),
                                  gathered_causal_attention(q_routed, k_routed, v_routed, selected))

    def local_share(self, gates: torch.Tensor) -> torch.Tensor:
        """The gates ``[batch, seq, heads of one kind]`` of this rank's heads of that kind."""
        local = gates.shape[-1] // self.tp.size
        return gates[..., self.tp.rank * local:(self.tp.rank + 1) * local]

    def by_role(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``t [batch, seq, local heads, ...]`` in head order → its shared and its routed heads."""
        grouped = t.unflatten(2, (self.local_groups, -1))
        return (grouped[:, :, :, :self.shared_per_group].flatten(2, 3),
                grouped[:, :, :, self.shared_per_group:].flatten(2, 3))

    def in_head_order(self, shared: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`by_role`."""
        grouped = (t.unflatten(2, (self.local_groups, -1)) for t in (shared, routed))
        return torch.cat(tuple(grouped), dim=3).flatten(2, 3)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of one token: :meth:`Attention.flops_per_token` with the attention products
        of only its s + top_k active heads, plus the router, 2·hidden·(heads + 2)."""
        inactive_heads = self.routed_heads - self.top_k
        skipped = 2 * 2 * inactive_heads * self.head_dim * seq_len
        return super().flops_per_token(seq_len) - skipped + 2 * self.hidden_size * (self.num_heads + 2)
