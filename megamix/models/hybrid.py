"""One model for every layer pattern: embedding → residual layers → norm → LM head (DESIGN.md §2)."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamix.config import ModelConfig
from megamix.nn import Attention, ForwardContext, RMSNorm, SwiGLU, init_parameters, rotary_tables

PIPELINE_STAGE_BOUNDARY = "|"


@dataclass(frozen=True)
class LayerKind:
    """What a pattern character builds: a readable name and the mixer built from the model config."""

    name: str
    build: Callable[[ModelConfig], nn.Module]


LAYER_KINDS: dict[str, LayerKind] = {
    "*": LayerKind("attention", lambda c: Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim)),
    "-": LayerKind("mlp", lambda c: SwiGLU(c.hidden_size, c.ffn_hidden_size)),
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


class HybridModel(nn.Module):
    """tokens ``[batch, seq]`` → embed → one residual layer per pattern character → norm → LM head.

    Returns logits ``[batch, seq, vocab]``; the LM head is the embedding matrix when
    ``cfg.tie_embeddings``. ``|`` in the pattern marks a pipeline-stage boundary, not a layer.

    Parameters are initialised by :func:`~megamix.nn.init.init_parameters` with
    ``seed``, directly on ``device`` (the modules are built on the meta device
    first, so no time goes to torch's default initialisation); on ``device="meta"``
    they stay uninitialised.
    Set ``recompute = True`` to recompute each residual layer's activations in
    the backward pass instead of storing them (training mode only).
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.recompute = False
        with torch.device("meta"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(
                ResidualLayer(RMSNorm(cfg.hidden_size, cfg.norm_eps), LAYER_KINDS[char].build(cfg))
                for char in cfg.pattern
                if char != PIPELINE_STAGE_BOUNDARY
            )
            self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.to_empty(device=device)
        if torch.device(device).type != "meta":  # a meta model only plans: counts parameters and FLOPs
            init_parameters(self, seed, cfg.init_std, cfg.num_layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        ctx = self.forward_context(tokens.shape[1], tokens.device)
        for layer in self.layers:
            if self.recompute and self.training:
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def forward_context(self, seq_len: int, device: torch.device) -> ForwardContext:
        """What every mixer of this forward shares: the rotary tables of positions 0 … seq_len − 1."""
        cos, sin = rotary_tables(torch.arange(seq_len, device=device), self.head_dim, self.rope_theta)
        return ForwardContext(rope_cos=cos, rope_sin=sin)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, optionally without the input embedding table (with tied embeddings, also the head)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs of one token: 3 × forward (the backward does two matmuls per forward one).

        Forward = the layers' :meth:`flops_per_token` + the LM head, 2·hidden·vocab.
        Only matmuls count (norms, activations, rotary, softmax do not); attention
        counts all seq_len keys (see :meth:`Attention.flops_per_token`).
        """
        head = 2 * self.embed.embedding_dim * self.embed.num_embeddings
        return 3 * (sum(layer.flops_per_token(seq_len) for layer in self.layers) + head)
