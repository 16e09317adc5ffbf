"""Measured pipeline bubble against theory, for 1F1B and interleaved 1F1B. Prints one JSON object.

Two pipeline ranks (one CPU thread each) train a dense model large enough that
compute dominates communication. Each step, every rank measures the time its
stages spend in forward and backward compute; the bubble is 1 − busy / step time,
averaged over ranks (the ``pp_bubble`` metric). Theory, with p stages per
pipeline and m micro-batches: (p − 1) / (m + p − 1) for 1F1B, and that divided by
the v virtual stages per rank for the interleaved schedule. Target: measured
within 10% of theory.

    python bench/pipeline.py [--micro-batches 8] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from megamix.config import load_config
from megamix.testing import run_distributed

CONFIG = "configs/tiny-dense.yaml"


def measure(overrides: list[str], steps: int) -> list[float]:
    """pp_bubble of each step after the first (runs on every rank)."""
    import time

    from megamix.train import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    bubbles = []
    for _ in range(steps + 1):
        trainer.pipeline.busy = 0.0
        start = time.perf_counter()
        trainer.train_step()
        bubbles.append(trainer.pipeline.bubble(time.perf_counter() - start))
    return bubbles[1:]  # the first step also infers the stages' shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    pp, m = 2, args.micro_batches
    results = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for name, vpp in (("1f1b", 1), ("interleaved", 2)):
            overrides = ["model.pattern=" + "*-" * 4, "model.hidden_size=512", "model.num_heads=8",
                         "model.num_kv_heads=8", "model.ffn_hidden_size=1536", "data.seq_len=256",
                         "train.micro_batch_size=1", f"train.global_batch_size={m}", f"parallel.pp={pp}",
                         f"parallel.vpp={vpp}", "train.resume=none", f"log.dir={run_dir}", "log.tensorboard=false"]
            measured = statistics.median(run_distributed(measure, pp, overrides, args.steps, timeout=600)[0])
            theory = (pp - 1) / (m + pp - 1) / vpp
            results[name] = {"pp": pp, "vpp": vpp, "micro_batches": m, "measured_bubble": measured,
                             "theoretical_bubble": theory, "ratio": measured / theory}
    print(json.dumps({"benchmark": "pipeline", **results}, indent=2))


if __name__ == "__main__":
    main()
