"""Layers of megamix models. Each takes plain arguments, never the run config."""

from megamix.nn.attention import Attention, causal_attention
from megamix.nn.context import ForwardContext
from megamix.nn.init import init_parameters
from megamix.nn.mlp import SwiGLU
from megamix.nn.norms import RMSNorm
from megamix.nn.rotary import apply_rotary, rotary_tables

__all__ = [
    "Attention",
    "ForwardContext",
    "RMSNorm",
    "SwiGLU",
    "apply_rotary",
    "causal_attention",
    "init_parameters",
    "rotary_tables",
]
