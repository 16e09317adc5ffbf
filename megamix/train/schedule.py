"""Learning-rate schedules (the optimizer itself is megamix.parallel.DistributedOptimizer).

The schedule is a pure function of the step, so the only scheduler state a
checkpoint needs is the step itself.
"""

from __future__ import annotations

import math

import torch

from megamix.config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then the schedule down to ``min_lr``.

    - cosine: min + (max − min)·½(1 + cos(π·progress)) over the steps after warmup.
    - wsd (warmup-stable-decay): constant ``lr``, then linear decay over the last
      ``decay_fraction`` of all steps.
    - constant: ``lr`` after warmup.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
    decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, cfg.steps - decay_start)
    return cfg.lr - (cfg.lr - cfg.min_lr) * min(progress, 1.0)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
