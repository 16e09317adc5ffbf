"""Context parallelism: bytes each rank sends, and step time, per mixer at two sequence lengths. CPU, gloo.

Each mixer — softmax attention (``*``, ring attention and the all-gather-K/V variant), Lightning (``L``) and
Mamba-2 (``M``), LASP-2 style — is layer 0 of a one-layer ``HybridModel`` with the dimensions of
``configs/tiny-hybrid.yaml`` (hidden 256, 4 heads of 64 with 2 kv heads; Mamba-2 16 heads of 32, state 32,
2 groups). ``--cp`` worker processes (gloo) each hold ``T`` tokens of one sample of ``cp · T`` (packed
documents off: ring attention's bytes do not depend on them). One step is the layer's forward and backward
(``out.backward(g)``, into the input and all weights); ``bytes_per_rank`` is what
:func:`megamix.parallel.record_communication` tallies on rank 0 for one step (point-to-point: the bytes
sent; all-gather and reduce-scatter: the ring algorithm's (p−1)/p of the full tensor), ``step_s`` the best
of ``--repeats`` timed steps after one warm-up (the slowest rank's time).

Printed JSON: per mixer and T, bytes and time; ``growth`` = bytes(2T) / bytes(T) per mixer (target for
``L`` and ``M``: 1.00, the state exchange does not depend on the length; ring attention: 2.00) and
``ring_over_lasp`` = ring attention's bytes / each linear mixer's bytes at the longer T (target ≥ 10 at
T = 16K).

    python bench/context_parallel.py [--tokens-per-rank 8192,16384] [--cp 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

MODEL = ["model.vocab_size=4096", "model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=704", "model.mamba.state_size=32", "model.mamba.head_dim=32",
         "model.mamba.num_groups=2"]
MIXERS = {"attention_ring": ("*", "ring"), "attention_all_gather": ("*", "all_gather"),
          "lightning": ("L", "ring"), "mamba2": ("M", "ring")}


def measure(pattern: str, attention_comm: str, cp: int, tokens_per_rank: int, repeats: int) -> dict:
    """On each rank: bytes sent in one step and the best step time."""
    import torch

    from megamix.config import load_config
    from megamix.models import HybridModel
    from megamix.parallel import ParallelState, record_communication
    from megamix.parallel.comm import all_reduce
    from megamix.parallel.context_parallel import SequenceLayout

    parallel = ParallelState.create(cp=cp)
    model = HybridModel(load_config(None, [*MODEL, f"model.pattern={pattern}"]).model, seed=0)
    layer = model.layers["0"]
    layout = SequenceLayout(cp * tokens_per_rank, parallel.cp, attention_comm=attention_comm)
    generator = torch.Generator().manual_seed(parallel.cp.rank)
    x = torch.randn(1, tokens_per_rank, 256, generator=generator, requires_grad=True)
    g = torch.randn(1, tokens_per_rank, 256, generator=generator)
    ctx = model.forward_context(layout, x.device)

    def step() -> None:
        x.grad = None
        for param in layer.parameters():
            param.grad = None
        layer(x, ctx).backward(g)

    step()  # warm-up
    with record_communication() as recorder:
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start])
        times.append(all_reduce(elapsed, parallel.cp, op=torch.distributed.ReduceOp.MAX).item())
    return {"bytes_per_rank": recorder.bytes_sent, "step_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-per-rank", default="8192,16384", help="two lengths T, the second 2× the first")
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lengths = [int(t) for t in args.tokens_per_rank.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.cp)))
    from megamix.testing import run_distributed

    results: dict[str, dict[str, dict]] = {}
    for name, (pattern, comm) in MIXERS.items():
        results[name] = {}
        for tokens in lengths:
            results[name][str(tokens)] = run_distributed(measure, args.cp, pattern, comm, args.cp, tokens,
                                                         args.repeats, timeout=3600)[0]
    short, long = (str(t) for t in lengths)
    growth = {name: by_length[long]["bytes_per_rank"] / by_length[short]["bytes_per_rank"]
              for name, by_length in results.items()}
    ring = results["attention_ring"][long]["bytes_per_rank"]
    ring_over_lasp = {name: ring / results[name][long]["bytes_per_rank"] for name in ("lightning", "mamba2")}
    print(json.dumps({"benchmark": "context_parallel", "machine": platform.node(), "cpu": platform.processor(),
                      "cp": args.cp, "tokens_per_rank": lengths, "results": results, "growth": growth,
                      "ring_over_lasp": ring_over_lasp}, indent=1))


if __name__ == "__main__":
    main()
