"""megamix: one parallel layer library for dense, MoE, MoH, Mamba-2, Lightning and hybrid LLMs."""

__version__ = "0.1.0"
