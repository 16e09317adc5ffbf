"""One model for every layer pattern: embedding → residual layers → norm → LM head (DESIGN.md §2)."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamix.config import ModelConfig
from megamix.nn import (
    Attention,
    ForwardContext,
    GatedMLP,
    LightningAttention,
    Mamba2Mixer,
    RMSNorm,
    init_parameters,
    rotary_tables,
)
from megamix.nn.aux_loss import AuxLosses
from megamix.nn.lightning import lightning_log_decay
from megamix.nn.moe import MoE
from megamix.nn.moh import MoHAttention
from megamix.parallel import (
    NO_TENSOR_PARALLEL,
    SINGLE,
    ColumnParallelLinear,
    Group,
    TensorParallel,
    VocabParallelEmbedding,
    column_parallel_linear,
    mark_sequence_parallel,
    sharding_of,
)
from megamix.parallel.context_parallel import SequenceLayout
from megamix.parallel.pipeline import STAGE_MARK, StageSpec, mark_tied_across_stages
from megamix.parallel.sharding import materialize


@dataclass(frozen=True)
class LayerKind:
    """What a pattern character builds: a readable name and the mixer built from the model config,
    the tensor-parallel group, the layer's index in the pattern and the expert-parallel group."""

    name: str
    build: Callable[[ModelConfig, TensorParallel, int, Group], nn.Module]


def _lightning(c: ModelConfig, tp: TensorParallel, index: int, ep: Group) -> LightningAttention:
    log_decay = lightning_log_decay(c.lightning.decay, c.num_heads, index, c.num_layers)
    return LightningAttention(c.hidden_size, c.num_heads, c.head_dim, log_decay, c.norm_eps, tp)


def _mamba(c: ModelConfig, tp: TensorParallel, index: int, ep: Group) -> Mamba2Mixer:
    m = c.mamba
    return Mamba2Mixer(c.hidden_size, m.num_heads, m.head_dim, m.state_size, m.num_groups, m.conv_kernel,
                       (m.dt_min, m.dt_max), c.norm_eps, tp, dt_floor=m.dt_floor)


def _moe(c: ModelConfig, tp: TensorParallel, index: int, ep: Group) -> MoE:
    m = c.moe
    return MoE(c.hidden_size, m.ffn_hidden_size, m.num_experts, m.top_k, score=m.score,
               normalize_top_k=m.normalize_top_k, aux_loss_coeff=m.aux_loss_coeff, aux_loss_type=m.aux_loss_type,
               z_loss_coeff=m.z_loss_coeff, bias_update_rate=m.bias_update_rate, shared_ffn_hidden_size=m.shared_width,
               num_groups=m.num_groups, top_k_groups=m.top_k_groups,
               routed_scaling_factor=m.routed_scaling_factor, capacity_factor=m.capacity_factor,
               drop_policy=m.drop_policy, kind=c.mlp, name=f"layers.{index}", tp=tp, ep=ep)


def _moh(c: ModelConfig, tp: TensorParallel, index: int, ep: Group) -> MoHAttention:
    return MoHAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.moh.shared_heads,
                        c.moh.routed_top_k, c.moh.aux_loss_coeff, name=f"layers.{index}", tp=tp)


LAYER_KINDS: dict[str, LayerKind] = {
    "*": LayerKind("attention",
                   lambda c, tp, i, ep: Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, tp)),
    "H": LayerKind("mixture-of-head attention", _moh),
    "L": LayerKind("lightning", _lightning),
    "M": LayerKind("mamba2", _mamba),
    "-": LayerKind("mlp", lambda c, tp, i, ep: GatedMLP(c.hidden_size, c.ffn_hidden_size, tp, c.mlp)),
    "E": LayerKind("moe", _moe),
}


def describe_layer_kinds() -> str:
    """The known pattern characters, e.g. ``"'*' attention, '-' mlp"``."""
    return ", ".join(f"{char!r} {kind.name}" for char, kind in LAYER_KINDS.items())


class ResidualLayer(nn.Module):
    """x + mixer(norm(x), ctx), ``x [batch, seq, hidden]``."""

    def __init__(self, norm: nn.Module, mixer: nn.Module):
        super().__init__()
        self.norm = norm
        self.mixer = mixer

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x + self.mixer(self.norm(x), ctx)

    def flops_per_token(self, seq_len: int) -> int:
        return self.mixer.flops_per_token(seq_len)


@dataclass
class DecodeState:
    """What generation carries from one :meth:`HybridModel.extend` call to the next.

    layers: the state of each token-mixing layer by name — a :class:`~megamix.nn.attention.KVCache` for
    ``*``/``H``, the fixed-size recurrent state for ``L``/``M`` (the per-token ``-``/``E`` layers keep none).
    valid: ``[batch, seen]`` bool, False where a row was left-padded.
    """

    layers: dict[str, Any]
    valid: torch.Tensor


class HybridModel(nn.Module):
    """tokens ``[batch, seq]`` → embed → one residual layer per pattern character → norm → LM head.

    Returns logits ``[batch, seq, vocab]``; the LM head is the embedding matrix when
    ``cfg.tie_embeddings``. ``|`` in the pattern marks a pipeline-stage boundary, not a layer.

    Parameters are initialised by :func:`~megamix.nn.init.init_parameters` with
    ``seed``, directly on ``device`` (the modules are built on the meta device
    first, so no time goes to torch's default initialisation); on ``device="meta"``
    they stay uninitialised.
    Set ``recompute = True`` to recompute each residual layer's activations in
    the backward pass instead of storing them (training mode only). Routed layers
    attach their auxiliary losses through ``aux`` (:class:`~megamix.nn.aux_loss.AuxLosses`),
    which also keeps their values for the metrics.

    Under expert parallelism each MoE layer holds its share of the experts of the ``ep`` group.
    With tensor parallelism ``tp`` the embedding, mixers and head are split over its
    ranks (see :mod:`megamix.parallel`) and the logits are the rank's vocabulary
    shard ``[batch, seq, vocab / tp]``, for :func:`~megamix.parallel.vocab_parallel_cross_entropy`.

    A pipeline ``stage`` builds only its layers (keeping their global indices, so
    parameter names do not depend on the split), the embedding if it is the first
    stage and the norm and head if it is the last; its forward maps hidden states
    ``[batch, seq, hidden]`` from the previous stage to those for the next.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu",
                 tp: TensorParallel = NO_TENSOR_PARALLEL, stage: StageSpec | None = None, ep: Group = SINGLE):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta if cfg.rotary else None
        self.hidden_size, self.vocab_size = cfg.hidden_size, cfg.vocab_size
        self.tp = tp
        self.recompute = False
        self.aux = AuxLosses()
        kinds = cfg.pattern.replace(STAGE_MARK, "")
        self.takes_tokens = stage is None or stage.is_first
        self.returns_logits = stage is None or stage.is_last
        with torch.device("meta"):
            if self.takes_tokens or (self.returns_logits and cfg.tie_embeddings):
                self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
            self.layers = nn.ModuleDict(
                (str(i), ResidualLayer(RMSNorm(cfg.hidden_size, cfg.norm_eps), LAYER_KINDS[kinds[i]].build(cfg, tp, i, ep)))
                for i in (range(len(kinds)) if stage is None else stage.layers)
            )
            if self.returns_logits:
                self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
                self.lm_head = None if cfg.tie_embeddings else ColumnParallelLinear(cfg.hidden_size, [cfg.vocab_size], tp)
        mark_sequence_parallel(self, tp)
        if stage is not None and cfg.tie_embeddings and stage.is_first != stage.is_last:
            mark_tied_across_stages(self.embed.weight)
        materialize(self, device)
        if torch.device(device).type != "meta":  # a meta model only plans: counts parameters and FLOPs
            init_parameters(self, seed, cfg.init_std, cfg.num_layers)

    def forward(self, x: torch.Tensor, sequence: SequenceLayout | None = None) -> torch.Tensor:
        """tokens ``[batch, seq]`` (first stage) or hidden states → hidden states or logits (last stage).

        ``sequence``: where the tokens sit in their samples (this rank's share under context parallelism) and
        the documents packed in them; by default each row is one whole sample of one document.
        """
        if sequence is None:
            seq_len = x.shape[1] * (self.tp.size if self.tp.sequence_parallel and not self.takes_tokens else 1)
            sequence = SequenceLayout(seq_len)
        if self.takes_tokens:
            x = self.embed(x)  # [batch, seq / tp, hidden] under SP
        ctx = self.forward_context(sequence, x.device)
        for layer in self.layers.values():
            if self.recompute and self.training:
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return self.logits(x) if self.returns_logits else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output ``[batch, seq, hidden]`` → final norm → LM head ``[batch, seq, vocab / tp]``."""
        x = self.norm(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return column_parallel_linear(x, self.embed.weight, self.tp)

    def initial_state(self, batch: int, device: torch.device | str) -> DecodeState:
        """The empty generation state of ``batch`` rows (see :meth:`extend`)."""
        if not (self.takes_tokens and self.returns_logits):
            raise ValueError("generation runs the whole model in one process: build it without a pipeline stage")
        layers = {name: layer.mixer.initial_state(batch, device) for name, layer in self.layers.items()
                  if hasattr(layer.mixer, "extend")}
        return DecodeState(layers, torch.zeros(batch, 0, dtype=torch.bool, device=device))

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, state: DecodeState, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Generation: feed ``new`` tokens ``[batch, new]`` after those already in ``state`` → logits ``[batch,
        new, vocab / tp]``, updating ``state`` in place. ``valid [batch, new]`` (default all True) marks left
        padding as False: padding takes no position and no token attends to it or carries it in a state.

        Prefill in chunks of any size and decode one token at a time both call this; the logits equal those
        of :meth:`forward` over the whole sequence. Softmax attention costs ``new × seen`` per call, the
        linear-time mixers a state of fixed size.
        """
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        seen = state.valid.sum(dim=1, keepdim=True)
        positions = (seen + valid.cumsum(dim=1) - 1).clamp(min=0)  # [batch, new]: position within each row
        state.valid = torch.cat([state.valid, valid], dim=1)
        x = self.embed(tokens)
        ctx = self.context_at(positions, SequenceLayout(tokens.shape[1]))
        for name, layer in self.layers.items():
            h = layer.norm(x)
            if name in state.layers:
                out, state.layers[name] = layer.mixer.extend(h, ctx, state.layers[name], state.valid)
            else:
                out = layer.mixer(h, ctx)
            x = x + out
        self.aux.pop()  # routing statistics are for training metrics; drop them so generation does not pile them up
        return self.logits(x)

    def forward_context(self, sequence: SequenceLayout, device: torch.device) -> ForwardContext:
        """What every mixer of this forward shares: the layout and the rotary tables of each token's position
        in its document (without rotary embeddings, every angle is 0: the rotation is the identity)."""
        return self.context_at(sequence.document_positions.to(device), sequence)

    def context_at(self, positions: torch.Tensor, sequence: SequenceLayout) -> ForwardContext:
        """The :class:`ForwardContext` of tokens at ``positions`` (``[seq]`` or ``[batch, seq]``) in ``sequence``."""
        if not self.rope_theta:
            positions = torch.zeros_like(positions)
        cos, sin = rotary_tables(positions, self.head_dim, self.rope_theta or 1.0)
        return ForwardContext(rope_cos=cos, rope_sin=sin, sequence=sequence, aux=self.aux)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count of the whole model (all TP shards), optionally without the input embedding
        table (with tied embeddings, also the head)."""
        total = sum(math.prod(sharding_of(p).global_shape) for p in self.parameters())
        return total - self.vocab_size * self.hidden_size if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs of one token: 3 × forward (the backward does two matmuls per forward one).

        Forward = the layers' :meth:`flops_per_token` + the LM head, 2·hidden·vocab.
        Only matmuls count (norms, activations, rotary, softmax do not); attention
        counts all seq_len keys (see :meth:`Attention.flops_per_token`).
        """
        head = 2 * self.hidden_size * self.vocab_size
        return 3 * (sum(layer.flops_per_token(seq_len) for layer in self.layers.values()) + head)
