"""Measured pipeline bubble against theory, for 1F1B and interleaved 1F1B. Prints one JSON object.

Two pipeline ranks (one CPU thread each, each bound to its own core) train a dense model (16 layers,
hidden 768) large enough that compute dominates communication (the interleaved schedule sends each
micro-batch across ranks three times as often as 1F1B; compute grows with hidden², traffic with
hidden), with enough layers that the measured-cost split can balance the stages (with 8 layers one
layer is 25% of a stage). Each step the ranks start the schedule together, and every rank measures
the time its stages spend in forward and backward compute and the loss; the bubble is 1 − busy /
schedule time (the longest rank's, from the common start to its last backward; the optimizer step is
not part of the pipeline), averaged over ranks (the ``pp_bubble`` metric). Theory, with p pipeline ranks,
v stages per rank and m micro-batches: the idle fraction (p − 1) / (v·m + p − 1), i.e.
(p − 1) / (m + p − 1) for 1F1B (v = 1). Target: measured within 10% of theory.

    python bench/pipeline.py [--micro-batches 8] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from megamix.config import load_config
from megamix.testing import run_distributed

CONFIG = "configs/tiny-dense.yaml"


def measure(overrides: list[str], steps: int) -> list[float]:
    """pp_bubble of each step after the first (runs on every rank)."""
    import torch.distributed as dist

    from megamix.train import Trainer

    if hasattr(os, "sched_setaffinity"):  # one core per rank, as a launcher binds ranks: no rank waits for a core
        os.sched_setaffinity(0, {dist.get_rank() % os.cpu_count()})
    trainer = Trainer(load_config(CONFIG, overrides))
    bubbles = []
    for _ in range(steps + 1):
        trainer.train_step()
        bubbles.append(trainer.pipeline.bubble())
    return bubbles[1:]  # the first step also infers the stages' shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    pp, m = 2, args.micro_batches
    results = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for name, vpp in (("1f1b", 1), ("interleaved", 2)):
            overrides = ["model.pattern=" + "*-" * 8, "model.hidden_size=768", "model.num_heads=12",
                         "model.num_kv_heads=12", "model.ffn_hidden_size=2048", "data.seq_len=256",
                         "train.micro_batch_size=1", f"train.global_batch_size={m}", f"parallel.pp={pp}",
                         f"parallel.vpp={vpp}", "train.resume=none", f"log.dir={run_dir}", "log.tensorboard=false"]
            measured = statistics.median(run_distributed(measure, pp, overrides, args.steps, timeout=600)[0])
            theory = (pp - 1) / (vpp * m + pp - 1)
            results[name] = {"pp": pp, "vpp": vpp, "micro_batches": m, "measured_bubble": measured,
                             "theoretical_bubble": theory, "ratio": measured / theory}
    print(json.dumps({"benchmark": "pipeline", **results}, indent=2))


if __name__ == "__main__":
    main()
