"""Layers of megamix models. Each takes plain arguments, never the run config."""

from megamix.nn.attention import Attention, causal_attention
from megamix.nn.context import ForwardContext
from megamix.nn.init import init_parameters
from megamix.nn.lightning import LightningAttention
from megamix.nn.mamba2 import Mamba2Mixer
from megamix.nn.mlp import GatedMLP
from megamix.nn.moe import MoE
from megamix.nn.moh import MoHAttention
from megamix.nn.norms import GatedRMSNorm, RMSNorm, SRMSNorm
from megamix.nn.rotary import apply_rotary, rotary_tables

__all__ = [
    "Attention",
    "ForwardContext",
    "GatedRMSNorm",
    "GatedMLP",
    "LightningAttention",
    "Mamba2Mixer",
    "MoE",
    "MoHAttention",
    "RMSNorm",
    "SRMSNorm",
    "apply_rotary",
    "causal_attention",
    "init_parameters",
    "rotary_tables",
]
