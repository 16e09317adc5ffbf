"""Perplexity by context length and by position: non-overlapping windows over a held-out token file.

A window of ``length + 1`` tokens gives ``length`` next-token losses; their mean over the windows of one
length is that length's loss (perplexity = e^loss), their mean per position is the loss by position (how
much the model gains from more context). Under context parallelism each window is split over the cp ranks
by :class:`~megamix.parallel.context_parallel.SequenceLayout` and the losses are gathered back; under
tensor parallelism the loss is the vocabulary-parallel cross entropy.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from megamix.data import IndexedDataset
from megamix.errors import ConfigError
from megamix.models import HybridModel
from megamix.parallel import ParallelState, vocab_parallel_cross_entropy
from megamix.parallel.comm import all_gather
from megamix.parallel.context_parallel import SequenceLayout


def load_tokens(path: str | Path, encode) -> np.ndarray:
    """The held-out tokens: a ``PREFIX`` of ``PREFIX.bin``/``PREFIX.idx`` (``megamix prepare-data``: documents
    with their EOS, end to end) or a text file, tokenized by ``encode``."""
    path = Path(path)
    if path.with_name(path.name + ".idx").is_file():
        return np.asarray(IndexedDataset(str(path)).tokens, dtype=np.int64)
    if path.is_file():
        return np.asarray(encode(path.read_text()), dtype=np.int64)
    raise ConfigError(f"held-out tokens {path}: neither a text file nor a PREFIX of PREFIX.bin/PREFIX.idx")


def windows(tokens: np.ndarray, length: int, count: int) -> torch.Tensor:
    """Up to ``count`` consecutive non-overlapping windows of ``length + 1`` tokens ``[windows, length + 1]``
    (neighbours share one token: the last target of one is the first input of the next)."""
    available = (len(tokens) - 1) // length
    if available < 1:
        raise ConfigError(f"the held-out token file has {len(tokens)} tokens, fewer than length {length} + 1")
    n = min(count, available)
    starts = np.arange(n) * length
    return torch.from_numpy(np.stack([tokens[s:s + length + 1] for s in starts]))


@torch.no_grad()
def window_losses(model: HybridModel, window: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    """Next-token losses ``[batch, length]`` (fp32, on every rank) of windows ``[batch, length + 1]``.

    Each cp rank runs its share of the positions (``SequenceLayout``: two chunks of 2·cp), so one window of
    any length costs each rank 1/cp of it; the losses are all-gathered and put back in order."""
    layout = SequenceLayout(window.shape[1] - 1, group=parallel.cp)
    inputs, targets = (layout.shard(t) for t in (window[:, :-1], window[:, 1:]))
    local = vocab_parallel_cross_entropy(model(inputs, layout), targets, parallel.tensor_parallel)
    if parallel.cp.size == 1:
        return local
    order = torch.cat([torch.arange(layout.chunk_span(c).start, layout.chunk_span(c).stop)
                       for rank in range(parallel.cp.size) for c in layout.chunks_of(rank)])
    losses = torch.empty(window.shape[0], layout.seq_len, dtype=local.dtype, device=local.device)
    losses[:, order.to(local.device)] = all_gather(local, parallel.cp, dim=1)
    return losses


def position_bins(length: int, bins: int = 16) -> list[tuple[int, int]]:
    """At most ``bins`` log-spaced position ranges [start, stop) covering 0 … length (for plots and records)."""
    edges = sorted({0, *np.unique(np.geomspace(1, length, bins).astype(int)).tolist(), length})
    return list(pairwise(edges))
