"""megamix_kernels: Triton kernels, each beside its plain PyTorch reference.

Installed as ``megamix_kernels`` (``kernels`` is taken on PyPI). The chunked
linear-attention-with-decay family and the fused norms land here (DESIGN.md §4).
"""
