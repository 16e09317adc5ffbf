"""Models built from a layer pattern (DESIGN.md §2)."""

from megamix.models.hybrid import LAYER_KINDS, HybridModel, LayerKind, ResidualLayer, describe_layer_kinds

__all__ = ["LAYER_KINDS", "HybridModel", "LayerKind", "ResidualLayer", "describe_layer_kinds"]
