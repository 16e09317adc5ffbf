"""Activation memory of one micro-batch: what autograd keeps from the forward for the backward.

Counted per layer kind from what the implementation saves (measured with
``torch.autograd.graph.saved_tensors_hooks``, tests/test_estimate.py), in elements per local token:

    residual   the layer's input and its norm's 1/rms, fp32 (the residual stream stays fp32 under
               autocast); sequence-sharded under SP, so ÷ tp there
    gathered   the mixer's full-sequence input (norm output, all-gathered under SP), which its first
               linear saves: never ÷ tp
    split      heads / ffn columns of this tensor-parallel rank, in the compute dtype
    fp32       per-token statistics kept in fp32 (softmax log-sum-exp, norm 1/rms, router scores)

plus per-micro-batch terms: the chunked linear-attention kernel's states — initial and final state
per sequence and one checkpoint per block of ``BLOCK_ROWS`` (token, head) rows, each
``[heads, key_dim, value_dim]`` fp32 — and the expert weights an MoE layer stacks for its grouped
matmul (saved for the backward, compute dtype).

Local tokens per micro-batch: micro_batch × seq_len / cp. Each sample is taken as one document
(packed documents add a state pair per document to the linear mixers: small next to the tokens').
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamix_kernels.linear_attention.chunk import BLOCK_ROWS

from megamix.config import ModelConfig
from megamix.nn.lightning import CHUNK_SIZE
from megamix.nn.mlp import MLP_MATRICES


@dataclass(frozen=True)
class MicroBatchShape:
    """One rank's share of a micro-batch: ``batch`` samples of ``local_seq`` = seq_len / cp tokens, on
    a tensor-parallel rank of ``tp`` (``sp``: sequence parallel), computed in ``dtype_bytes``
    (2 under bf16 autocast, else 4), experts split over ``ep``, samples split over ``cp``."""

    batch: int
    local_seq: int
    tp: int
    sp: bool
    dtype_bytes: int
    ep: int = 1
    cp: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.local_seq


def _per_token(shape: MicroBatchShape, residual: float, gathered: float, split: float, fp32: float) -> float:
    """Bytes per local token from element counts (split and fp32 already per tensor-parallel rank)."""
    residual_bytes = 4 * residual / (shape.tp if shape.sp else 1)
    return residual_bytes + shape.dtype_bytes * (gathered + split) + 4 * fp32


def _linear_attention_state(s: MicroBatchShape, heads: int, key_heads: int, key_dim: int, value_dim: int) -> float:
    """Bytes the chunked linear-attention kernel saves for ``heads`` local heads (``key_heads`` of q, k):
    2 states per sequence (initial, final) and one per block of BLOCK_ROWS // (heads · chunk) chunks,
    each ``[heads, key_dim, value_dim]`` fp32.

    Under context parallelism (LASP-2, :mod:`megamix.parallel.lasp`) each of the rank's 2 sample chunks
    is a sequence of its own; the prefix combine keeps the state entering each step of its recurrence
    (2cp − 1 per sample) and the 2 states entering the local chunks, and the incoming-state term keeps,
    per token, q·e^G (q copied per value head when key heads are shared) and e^G, in fp32."""
    sequences = s.batch * (2 if s.cp > 1 else 1)
    chunks = sequences * math.ceil(s.local_seq * s.batch / sequences / CHUNK_SIZE)
    blocks = math.ceil(chunks / max(1, BLOCK_ROWS // (heads * CHUNK_SIZE)))
    states = 2 * sequences + blocks
    per_token = 0
    if s.cp > 1:
        states += (2 * s.cp - 1 + 2) * s.batch
        per_token = heads * (key_dim + 1) + (heads * key_dim if key_heads < heads else 0)
    return 4 * (states * heads * key_dim * value_dim + s.tokens * per_token)


def attention_bytes(c: ModelConfig, s: MicroBatchShape) -> float:
    """``*``: q, rope(k), v, the output and its log-sum-exp (kv heads replicated when fewer than tp)."""
    h, d = c.hidden_size, c.head_dim
    heads, kv_heads = c.num_heads // s.tp, max(c.num_kv_heads // s.tp, 1)
    per_token = _per_token(s, h + 1, h, (2 * heads + 2 * kv_heads) * d, heads)
    return s.tokens * per_token


def moh_bytes(c: ModelConfig, s: MicroBatchShape) -> float:
    """``H``: attention's tensors, the gated head outputs, and the router's fp32 logits, softmaxes and gates;
    under autocast the router, which runs in fp32, also keeps the fp32 input next to the projections' cast."""
    heads = c.num_heads // s.tp
    router = 3 * (c.num_heads + 2) + heads + (c.hidden_size if s.dtype_bytes < 4 else 0)
    return attention_bytes(c, s) + s.tokens * (s.dtype_bytes * heads * c.head_dim + 4 * router)


def lightning_bytes(c: ModelConfig, s: MicroBatchShape) -> float:
    """``L``: [q|k|v|u], swish(q), swish(k), o, SRMSNorm(o), its product with u (9 widths of heads ×
    head_dim), the norm's 1/rms per head, and the kernel's states."""
    heads, d = c.num_heads // s.tp, c.head_dim
    per_token = _per_token(s, c.hidden_size + 1, c.hidden_size, 9 * heads * d, heads)
    return s.tokens * per_token + _linear_attention_state(s, heads, heads, d, d)


def mamba_bytes(c: ModelConfig, s: MicroBatchShape) -> float:
    """``M``: in_proj's [z|xBC|Δ]; xBC padded for the conv, its output and SiLU; Δ + bias and softplus;
    Δ·x; y + D·x; the gated norm's output (and fp32 log-decay and 1/rms per group); the kernel's states."""
    m = c.mamba
    heads, groups = m.num_heads // s.tp, m.num_groups // s.tp
    d_inner, conv = heads * m.head_dim, heads * m.head_dim + 2 * groups * m.state_size
    padded = conv * (s.local_seq + m.conv_kernel - 1) / s.local_seq
    split = (d_inner + conv + heads) + padded + 2 * conv + 2 * heads + 3 * d_inner
    per_token = _per_token(s, c.hidden_size + 1, c.hidden_size, split, heads + groups)
    return s.tokens * per_token + _linear_attention_state(s, heads, groups, m.state_size, m.head_dim)


# Widths of ffn_hidden_size an MLP saves: swiglu [gate|up], SiLU(gate) and the product; sglu [gate|up]
# and the product; relu2 relu(up) (its square's input) and the square (down_proj's input).
MLP_WIDTHS = {"swiglu": 4, "sglu": 3, "relu2": 2}


def mlp_bytes(c: ModelConfig, s: MicroBatchShape) -> float:
    """``-``: the MLP's intermediate tensors (:data:`MLP_WIDTHS`)."""
    split = MLP_WIDTHS[c.mlp] * c.ffn_hidden_size // s.tp
    return s.tokens * _per_token(s, c.hidden_size + 1, c.hidden_size, split, 0)


def moe_bytes(c: ModelConfig, s: MicroBatchShape) -> float:
    """``E``: the router's input (a sequence shard under SP) and fp32 scores; per routed copy of a token
    (top-k) its dispatched input, the expert's MLP tensors (:data:`MLP_WIDTHS`) and its output; the shared
    experts' MLP; and the local experts' weights stacked for the grouped matmul (per micro-batch)."""
    moe, h = c.moe, c.hidden_size
    ffn = moe.ffn_hidden_size // s.tp
    routed = moe.top_k * (3 * h + MLP_WIDTHS[c.mlp] * ffn)
    shared = (MLP_WIDTHS[c.mlp] * moe.shared_width // s.tp + h) if moe.shared_experts else 0
    router = 2 * moe.num_experts + 5 * moe.top_k  # scores, logits; indices, order, token (int64) and weights
    per_token = _per_token(s, 2 * h + 1, 0, routed + shared, router)
    stacked = (moe.num_experts // s.ep) * MLP_MATRICES[c.mlp] * h * ffn * s.dtype_bytes
    return s.tokens * per_token + stacked


LAYER_ACTIVATIONS = {"*": attention_bytes, "H": moh_bytes, "L": lightning_bytes, "M": mamba_bytes,
                     "-": mlp_bytes, "E": moe_bytes}


def layer_bytes(kind: str, c: ModelConfig, s: MicroBatchShape) -> float:
    """Activation bytes one layer of pattern character ``kind`` keeps for one micro-batch on one rank."""
    return LAYER_ACTIVATIONS[kind](c, s)


def recompute_bytes(c: ModelConfig, s: MicroBatchShape) -> float:
    """With ``train.recompute`` a layer keeps only its input (the residual stream, fp32)."""
    return s.tokens * 4 * c.hidden_size / (s.tp if s.sp else 1)


def head_bytes(c: ModelConfig, s: MicroBatchShape) -> float:
    """The final norm's input and 1/rms, the LM head's input and the vocabulary shard of logits the loss
    keeps, plus the loss's per-token targets (int64), mask and normaliser."""
    return s.tokens * (_per_token(s, c.hidden_size + 1, c.hidden_size, c.vocab_size // s.tp, 0) + 8 + 1 + 4)


def embedding_bytes(c: ModelConfig, s: MicroBatchShape) -> float:
    """The token ids (int64) and, with softmax attention, the rotary tables cos and sin (fp32, shared
    by every attention layer)."""
    rotary = 2 * c.head_dim * 4 if any(k in c.pattern for k in "*H") else 0
    return s.tokens * (8 + rotary)
