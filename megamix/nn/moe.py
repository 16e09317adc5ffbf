"""Mixture-of-experts MLP mixer (pattern ``E``): each token runs through k of E expert MLPs.

    s = softmax(W_r x)  or  sigmoid(W_r x)         router scores  [tokens, E]
    K = top-k_i (s_i + b_i)                         b: the balancing bias, which moves only the selection
                                                    (optionally only among the experts of the best groups)
    g_i = α · s_i, i ∈ K  (optionally α · s_i / Σ_K s)   combine weights, α the routed scaling factor
    y = Σ_{i∈K} g_i · FFN_i(x) + FFN_shared(x)      FFN: the MLP of ``model.mlp``, e.g. SwiGLU
                                                    W_down (silu(W_gate x) ⊙ W_up x) or squared ReLU

The experts run without a Python loop over experts: the (token, expert) assignments are
sorted by expert and each projection is one grouped matmul over the sorted rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamix.errors import ConfigError
from megamix.nn.context import ForwardContext
from megamix.nn.mlp import GatedMLP, mlp_activation
from megamix.parallel.experts import ExpertDispatch
from megamix.parallel.sharding import mark_expert_parallel
from megamix.parallel.state import NO_TENSOR_PARALLEL, SINGLE, Group, TensorParallel
from megamix.parallel.tensor_parallel import tp_input, tp_output


def top_k_routing(scores: torch.Tensor, bias: torch.Tensor, top_k: int, normalize: bool, num_groups: int = 1,
                  top_k_groups: int = 1, scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k experts of each token and their combine weights.

    scores ``[..., E]``, bias ``[E]`` → indices ``[..., k]`` (best first), weights ``[..., k]``.
    The experts are those with the top ``s + b``; the weights are the unbiased scores ``s``
    (DeepSeek-V3's auxiliary-loss-free balancing), divided by their sum when ``normalize``, times
    ``scaling_factor``. Group-limited routing (DeepSeek-V3, ``num_groups`` > 1): the E experts form
    ``num_groups`` consecutive groups, each scored by the sum of its two best ``s + b``, and a token
    picks its k experts only from its ``top_k_groups`` best groups.
    """
    choice = scores + bias
    if num_groups > 1:
        grouped = choice.unflatten(-1, (num_groups, -1))  # [..., groups, E / groups]
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        best = group_scores.topk(top_k_groups, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, best, True)
        choice = grouped.masked_fill(~allowed.unsqueeze(-1), -math.inf).flatten(-2)
    indices = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return indices, weights * scaling_factor


def switch_aux_loss(prob_sum: torch.Tensor, load: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, averaged over groups of tokens (a micro-batch or a sequence).

    L = mean_g  E/k · Σ_i f_gi P_gi,  f_gi = load_gi / T (Σ_i f_gi = k),  P_gi = prob_sum_gi / T,
    with prob_sum ``[groups, E]`` the router probabilities summed over the group's T = ``num_tokens``
    tokens and load ``[groups, E]`` their assignments per expert. Perfect balance gives 1; only P
    carries a gradient.
    """
    num_experts = load.shape[-1]
    per_group = (load * prob_sum).sum(-1) * num_experts / (top_k * num_tokens ** 2)
    return per_group.mean()


def router_z_loss(logits: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """ST-MoE's z-loss, Σ_t (log Σ_i exp(logits_ti))² / num_tokens, over logits ``[..., E]``."""
    return logits.logsumexp(dim=-1).square().sum() / num_tokens


def sort_by_expert(indices: torch.Tensor, scores: torch.Tensor, num_experts: int, capacity: int | None = None,
                   drop_policy: str = "probability") -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, expert) assignments grouped by expert, without those over an expert's capacity.

    indices, scores ``[tokens, k]`` (the experts and their router scores) → order ``[kept]``: flat
    indices of the kept assignments (token = order // k), sorted by expert; counts ``[num_experts]``:
    kept assignments per expert. An expert keeps at most ``capacity`` assignments (None: all): those
    of highest score (``"probability"``) or of the first tokens (``"position"``); ties go to the
    earlier token.
    """
    experts = indices.flatten()
    order = torch.argsort(experts, stable=True)  # by expert, then by position
    counts = torch.bincount(experts, minlength=num_experts)
    if capacity is None:
        return order, counts
    if drop_policy == "probability":
        by_score = torch.argsort(scores.flatten(), descending=True, stable=True)
        order = by_score[torch.argsort(experts[by_score], stable=True)]
    rank_in_expert = torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[experts[order]]
    return order[rank_in_expert < capacity], counts.clamp(max=capacity)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y_t = x_t W_gᵀ for the rows t of group g: x ``[rows, in]`` sorted by group, weight
    ``[groups, out, in]``, counts ``[groups]`` (summing to rows) → ``[rows, out]``.

    One call of torch's grouped GEMM, ``F.grouped_mm`` (a CUTLASS kernel on CUDA bf16 (sm90+),
    one mm per group elsewhere, CPU included), whose gradients are those of the loop over groups.
    It needs rows whose size is a multiple of 16 bytes: other widths are zero-padded (the padding
    adds zero terms). Under autocast it computes in the autocast dtype, as ``F.linear`` does.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    out_features = weight.shape[1]
    align = 16 // x.element_size()
    pad_in, pad_out = -x.shape[1] % align, -out_features % align
    if pad_in or pad_out:
        x, weight = F.pad(x, (0, pad_in)), F.pad(weight, (0, pad_in, 0, pad_out))
    y = F.grouped_mm(x, weight.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    return y[:, :out_features]


class MoE(nn.Module):
    """Routed expert MLPs plus optional shared ones, ``x [batch, seq, hidden] → [batch, seq, hidden]``.

    Parameters: ``router.weight [E, hidden]``; ``experts.<e>`` for this ep rank's experts, e the
    global index (rank r of ``ep`` holds [r·E/ep, (r+1)·E/ep)), each a :class:`GatedMLP` of ``kind``
    whose ffn dim is split over TP (its input projection column-parallel, ``down_proj``
    row-parallel) and marked expert-parallel; ``shared_experts``, one GatedMLP of
    ``shared_ffn_hidden_size`` (0: none) that every token uses. The experts' own forwards (with
    their TP collectives) are not used: the layer gathers the tokens once and reduces once.

    Routing: see :func:`top_k_routing` (``score``, ``normalize_top_k``, ``num_groups``,
    ``top_k_groups``, ``routed_scaling_factor``). With
    ``capacity_factor`` c an expert takes at most ⌈c·T·k/E⌉ of the T tokens of the rank's
    micro-batch and drops the rest by ``drop_policy`` (:func:`sort_by_expert`); None is dropless.

    Balancing, through ``ctx.aux``: ``moe_aux_loss`` (:func:`switch_aux_loss` over the micro-batch,
    ``aux_loss_type="batch"``, or per sequence, ``"sequence"``; for sigmoid scores P uses the scores
    normalised over experts), ``moe_z_loss`` (:func:`router_z_loss`), and the statistic
    ``moe_load_imbalance/<name>`` = max/mean tokens per expert of the micro-batch (before dropping).
    Auxiliary-loss-free balancing (``bias_update_rate`` > 0): training forwards add the tokens per
    expert to the buffer ``tokens_per_expert [E]`` (int64, not saved); once per optimizer step the
    trainer all-reduces it over the data-parallel ranks and calls :meth:`update_expert_bias`, which
    moves the buffer ``expert_bias [E]`` (saved) towards balance.

    Tensor parallel: the router runs on the layer's input (a sequence shard under SP); its scores
    and the tokens are gathered (:func:`tp_input`) so that every TP rank routes all tokens alike and
    runs its ffn slice of every expert; the gated sum of the experts (partial over TP) is reduced
    once (:func:`tp_output`). The gathered scores' backward sums the ranks' partial gradients, so
    ``router.weight`` gets the same gradient on every TP rank; under SP it is partial, from the
    rank's own tokens, and is summed over TP like the norms' (``mark_sequence_parallel``).
    Expert parallel: see :mod:`megamix.parallel.experts`.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int, *,
                 score: str = "softmax", normalize_top_k: bool = True, aux_loss_coeff: float = 0.0,
                 aux_loss_type: str = "batch", z_loss_coeff: float = 0.0, bias_update_rate: float = 0.0,
                 shared_ffn_hidden_size: int = 0, num_groups: int = 1, top_k_groups: int = 1,
                 routed_scaling_factor: float = 1.0, capacity_factor: float | None = None,
                 drop_policy: str = "probability", kind: str = "swiglu", name: str = "moe",
                 tp: TensorParallel = NO_TENSOR_PARALLEL, ep: Group | None = None):
        super().__init__()
        for what, value, known in (("score", score, ("softmax", "sigmoid")),
                                   ("aux_loss_type", aux_loss_type, ("batch", "sequence")),
                                   ("drop_policy", drop_policy, ("probability", "position"))):
            if value not in known:
                raise ValueError(f"unknown MoE {what} {value!r}; known: {', '.join(known)}")
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"the MoE top_k ({top_k}) must be between 1 and num_experts ({num_experts})")
        if num_experts % num_groups or not 1 <= top_k_groups <= num_groups \
                or top_k > top_k_groups * (num_experts // num_groups):
            raise ConfigError(f"MoE routing groups: need num_experts ({num_experts}) divisible by num_groups "
                              f"({num_groups}), 1 <= top_k_groups ({top_k_groups}) <= num_groups, and top_k "
                              f"({top_k}) experts within top_k_groups groups")
        ep = ep or SINGLE
        if num_experts % ep.size:
            raise ConfigError(f"the number of experts ({num_experts}) must be divisible by parallel.ep ({ep.size})")
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k = num_experts, top_k
        self.score, self.normalize_top_k = score, normalize_top_k
        self.aux_loss_coeff, self.aux_loss_type, self.z_loss_coeff = aux_loss_coeff, aux_loss_type, z_loss_coeff
        self.bias_update_rate = bias_update_rate
        self.num_groups, self.top_k_groups, self.routed_scaling_factor = num_groups, top_k_groups, routed_scaling_factor
        self.kind = kind
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.name, self.tp, self.ep = name, tp, ep

        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        local = num_experts // ep.size
        self.experts = nn.ModuleDict(
            (str(e), GatedMLP(hidden_size, ffn_hidden_size, tp, kind))
            for e in range(ep.rank * local, (ep.rank + 1) * local))
        for param in self.experts.parameters():
            mark_expert_parallel(param, tp.size)
        self.shared_experts = GatedMLP(hidden_size, shared_ffn_hidden_size, tp, kind) if shared_ffn_hidden_size else None
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def reset_buffers(self) -> None:
        """Zero ``expert_bias`` and ``tokens_per_expert`` (e.g. after ``to_empty`` from the meta device)."""
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x ``[batch, seq, hidden]`` (``[batch, seq / tp, hidden]`` under SP) → the same shape."""
        logits = self.router(x).float()  # [batch, seq_local, E]; scores, top-k and losses in fp32
        scores = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        all_scores = tp_input(scores, self.tp)  # [batch, seq, E]
        indices, weights = top_k_routing(all_scores, self.expert_bias, self.top_k, self.normalize_top_k,
                                         self.num_groups, self.top_k_groups, self.routed_scaling_factor)
        tokens = tp_input(x, self.tp)  # [batch, seq, hidden]
        y = self._routed_experts(tokens.flatten(0, 1), all_scores.flatten(0, 1), indices.flatten(0, 1),
                                 weights.flatten(0, 1))
        if self.shared_experts is not None:
            y = y + self._shared_experts(tokens.flatten(0, 1))
        y = tp_output(y.view(*tokens.shape[:2], -1), self.tp)
        return self._balance(y, logits, scores, indices, ctx)

    def _routed_experts(self, tokens: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
        """Σ_{i∈K} g_i · FFN_i(x) for tokens ``[T, hidden]``, scores ``[T, E]``, the chosen experts and their
        combine weights ``[T, k]`` → ``[T, hidden]`` (partial over TP)."""
        capacity = (None if self.capacity_factor is None else
                    math.ceil(self.capacity_factor * tokens.shape[0] * self.top_k / self.num_experts))
        order, counts = sort_by_expert(indices, scores.gather(1, indices), self.num_experts, capacity,
                                       self.drop_policy)
        token = order // self.top_k
        routes = ExpertDispatch.plan(counts, self.ep)
        # index_select, not tokens[token]: its backward is an index_add, not a serial index_put accumulate
        rows = routes.dispatch(tokens.index_select(0, token))
        expert_out = routes.combine(self._local_experts(rows, routes.local_counts))
        gated = expert_out * weights.flatten()[order, None].to(expert_out.dtype)
        return gated.new_zeros(tokens.shape).index_add(0, token, gated)

    def _local_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """This rank's experts on their rows: x ``[rows, hidden]`` grouped by local expert, counts
        ``[local experts]`` → ``[rows, hidden]`` (partial over TP). The weights are stacked per call:
        parameters stay per expert, and the copy is small next to the matmuls."""
        up = torch.stack([expert.in_proj.weight for expert in self.experts.values()])
        down = torch.stack([expert.down_proj.weight for expert in self.experts.values()])
        return grouped_linear(mlp_activation(self.kind, grouped_linear(x, up, counts)), down, counts)

    def _shared_experts(self, tokens: torch.Tensor) -> torch.Tensor:
        """FFN_shared(tokens ``[T, hidden]``) → ``[T, hidden]`` (partial over TP)."""
        mlp = self.shared_experts
        return F.linear(mlp_activation(self.kind, F.linear(tokens, mlp.in_proj.weight)), mlp.down_proj.weight)

    def _balance(self, y: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor,
                 ctx: ForwardContext) -> torch.Tensor:
        """Attach the auxiliary losses to ``y``, record the load imbalance and count the load.

        logits, scores ``[batch, seq_local, E]`` of this rank's tokens; indices ``[batch, seq, k]`` of all.
        """
        batch, seq, _ = indices.shape
        local_load = indices.new_zeros(batch, self.num_experts).scatter_add_(  # [batch, E] per sequence
            1, indices.flatten(1), torch.ones_like(indices).flatten(1))
        # under context parallelism each sequence is spread over the cp ranks: balance the whole sequences
        load = ctx.sequence.sum_over_ranks(local_load)
        seq_tokens = seq * ctx.sequence.group.size
        probs = scores if self.score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        prob_sum = probs.sum(dim=1)  # [batch, E]
        if self.aux_loss_type == "batch":
            load, prob_sum, group_tokens = load.sum(0, keepdim=True), prob_sum.sum(0, keepdim=True), batch * seq_tokens
        else:
            group_tokens = seq_tokens
        # the losses of this rank's tokens (a sequence shard under SP and CP), valued over all of them
        aux_loss = ctx.sequence.total_of_shares(switch_aux_loss(prob_sum, load, group_tokens, self.top_k), self.tp)
        z_loss = ctx.sequence.total_of_shares(router_z_loss(logits, batch * seq_tokens), self.tp)
        y = ctx.aux.attach(y, "moe_aux_loss", aux_loss, self.aux_loss_coeff)
        y = ctx.aux.attach(y, "moe_z_loss", z_loss, self.z_loss_coeff)

        tokens_per_expert = load.sum(0)
        ctx.aux.record(f"moe_load_imbalance/{self.name}", tokens_per_expert.max() / tokens_per_expert.float().mean())
        if self.training and self.bias_update_rate:
            self.tokens_per_expert += local_load.sum(0)
        return y

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor) -> None:
        """b_i += rate · sign(mean(counts) − counts_i) and clear ``tokens_per_expert``.

        counts ``[E]``: the step's tokens per expert over all data-parallel ranks (``tokens_per_expert``
        all-reduced), so that every rank moves its bias alike.
        """
        counts = counts.float()
        self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)
        self.tokens_per_expert.zero_()

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of one token (2 per multiply-add): the router, its k experts and the shared ones."""
        routed = self.top_k * next(iter(self.experts.values())).flops_per_token(seq_len)
        shared = self.shared_experts.flops_per_token(seq_len) if self.shared_experts is not None else 0
        return 2 * self.hidden_size * self.num_experts + routed + shared
