"""Bytes each rank sends per training step at tp=2, with and without sequence parallelism,
against the analytic minimum of the Megatron analysis. Prints one JSON object.

Measured: every collective megamix issues during one optimizer step, tallied by
``megamix.parallel.record_communication`` (ring-algorithm bytes per rank).
Analytic, per micro-batch of activations A = batch·seq·hidden·4 bytes, on p ranks:
  without SP  each mixer (attention or MLP) one all-reduce of A forward and one
              backward; the embedding one forward, the LM head input one backward;
  with SP     the same volume as all-gather + reduce-scatter pairs, plus one
              all-reduce of the norm gradients per step;
  both        the vocab-parallel loss: all-reduces of its max and of
              [target logit, sum exp] (3·batch·seq·4 bytes); the gradient norm (8 bytes).
Target: ratio measured / analytic = 1.00 (no collective beyond the analysis).

    python bench/comm.py [--seq-len 128] [--micro-batches 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from megamix.config import load_config
from megamix.testing import run_distributed

CONFIG = "configs/tiny-dense.yaml"


def measure(overrides: list[str]) -> float:
    """Bytes rank 0 sends in one training step (runs on every rank)."""
    from megamix.parallel import record_communication
    from megamix.train import Trainer

    trainer = Trainer(load_config(CONFIG, overrides))
    trainer.train_step()  # warm-up: the builtin corpus and lazy state are ready afterwards
    with record_communication() as recorder:
        trainer.train_step()
    return recorder.bytes_sent


def analytic(overrides: list[str], tp: int) -> float:
    config = load_config(CONFIG, overrides)
    m, t = config.model, config.train
    micro_batches = t.global_batch_size // t.micro_batch_size
    activation = t.micro_batch_size * config.data.seq_len * m.hidden_size * 4
    # ring bytes per rank: all-reduce 2(p−1)/p·N; an all-gather + reduce-scatter pair sends the same
    all_reduce = 2 * (tp - 1) / tp
    per_micro = (2 * m.num_layers + 2) * all_reduce * activation  # mixers fwd+bwd, embedding, head input
    per_micro += all_reduce * 3 * t.micro_batch_size * config.data.seq_len * 4  # vocab-parallel loss
    per_step = micro_batches * per_micro + all_reduce * 8  # gradient norm (fp64)
    if config.parallel.sequence_parallel:
        norms = (m.num_layers + 1) * m.hidden_size * 4
        per_step += all_reduce * norms
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=2)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for sequence_parallel in (False, True):
            overrides = ["parallel.tp=2", f"parallel.sequence_parallel={str(sequence_parallel).lower()}",
                         f"data.seq_len={args.seq_len}", "train.micro_batch_size=4",
                         f"train.global_batch_size={4 * args.micro_batches}", "train.resume=none",
                         "log.tensorboard=false", f"log.dir={run_dir}", "checkpoint.interval=0"]
            measured = run_distributed(measure, 2, overrides)[0]
            expected = analytic(overrides, 2)
            results["tp2_sp" if sequence_parallel else "tp2"] = {
                "bytes_sent_per_rank": measured, "analytic_bytes": expected, "ratio": measured / expected}
    print(json.dumps({"benchmark": "comm", "config": CONFIG, **results}, indent=2))


if __name__ == "__main__":
    main()
