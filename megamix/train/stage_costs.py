"""Per-layer cost of a model on this device, for cutting it into balanced pipeline stages.

FLOP counts mislead here: an attention kernel runs below matmul efficiency, and the
embedding's backward and the loss do work no FLOP count of the layers sees. So each
distinct layer kind, the embedding and the head with its loss are timed once,
forward and backward, on one micro-batch; all ranks then average the timings so
they agree on the same split.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from megamix.config import ModelConfig
from megamix.models import HybridModel
from megamix.parallel import Group, vocab_parallel_cross_entropy
from megamix.parallel.comm import all_reduce
from megamix.parallel.context_parallel import SequenceLayout
from megamix.parallel.pipeline import STAGE_MARK


def _seconds(run: Callable[[], torch.Tensor], repeats: int = 2) -> float:
    """Best of ``repeats`` timings of ``run()`` and its backward, after one warm-up."""
    best = float("inf")
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        run().backward()
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best


def measured_layer_costs(cfg: ModelConfig, micro_batch: int, seq_len: int, device: torch.device,
                         world: Group) -> list[float]:
    """Seconds per micro-batch of each layer of ``cfg.pattern``; the embedding's added to the first
    layer, the final norm, head and loss's to the last."""
    kinds = cfg.pattern.replace(STAGE_MARK, "")
    distinct = "".join(dict.fromkeys(kinds))
    probe = HybridModel(dataclasses.replace(cfg, pattern=distinct), device=device)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=device)
    hidden = torch.randn(micro_batch, seq_len, cfg.hidden_size, device=device, requires_grad=True)
    ctx = probe.forward_context(SequenceLayout(seq_len), device)
    layers = dict(zip(distinct, probe.layers.values()))

    def head_and_loss() -> torch.Tensor:
        head = probe.lm_head.weight if probe.lm_head is not None else probe.embed.weight
        logits = torch.nn.functional.linear(probe.norm(hidden), head)
        return vocab_parallel_cross_entropy(logits, tokens[:, 1:]).mean()

    timings = [_seconds(lambda layer=layer: layer(hidden, ctx).sum()) for layer in layers.values()]
    timings += [_seconds(lambda: probe.embed(tokens[:, :-1]).sum()), _seconds(head_and_loss)]
    agreed = all_reduce(torch.tensor(timings, dtype=torch.float64), world).div_(world.size).tolist()
    per_kind = dict(zip(distinct, agreed))
    costs = [per_kind[kind] for kind in kinds]
    costs[0] += agreed[-2]
    costs[-1] += agreed[-1]
    return costs
