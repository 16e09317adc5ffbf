"""Training: the trainer loop, optimizer and schedules, metrics."""

from megamix.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
