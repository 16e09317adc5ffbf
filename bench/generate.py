"""Generation: prefill and decode speed and memory over context length, for linear, hybrid and attention models. CPU.

Three tiny models of the same size (hidden 256, 4 heads of 64 with 2 kv heads, SwiGLU MLPs of 704, Mamba-2
with 16 heads of 32 and state 32, vocabulary 4096, fp32), differing only in their token mixers:

- ``linear``: ``L-M-L-M-`` (Lightning and Mamba-2 only: a fixed-size recurrent state),
- ``hybrid``: ``M-*-L-M-`` (one softmax-attention layer: a KV cache),
- ``attention``: ``*-*-*-*-`` (a KV cache in every layer).

For each context length T (1K, 4K, 16K by default), in a fresh process: the prompt of T random tokens is
prefilled through :meth:`HybridModel.extend` in chunks of ``megamix.eval.generate.PREFILL_CHUNK`` (one row),
then ``--decode`` tokens are decoded one at a time (greedy). Reports prefill tokens/s, decode ms per token
(median over the decoded tokens, after 2 warm-up tokens), the decode state's size (every tensor the
:class:`DecodeState` holds) and the process's peak RSS above its RSS after building the model.

Printed JSON, with ``flatness`` = value at the longest T ÷ value at the shortest, per model, for decode time
per token and state size. Target (issue 10): the ``linear`` model's ratios ≤ 1.1.

    python bench/generate.py [--lengths 1024,4096,16384] [--decode 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time

MODEL = ["model.vocab_size=4096", "model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=704", "model.mamba.state_size=32", "model.mamba.head_dim=32",
         "model.mamba.num_groups=2"]
PATTERNS = {"linear": "L-M-L-M-", "hybrid": "M-*-L-M-", "attention": "*-*-*-*-"}
WARMUP_TOKENS = 2


def _state_bytes(value) -> int:
    """Bytes of every tensor inside ``value`` (tensors, containers and dataclasses of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_bytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(_state_bytes(v) for v in vars(value).values())
    return 0


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(pattern: str, length: int, decode: int, threads: int) -> dict:
    """One (model, context length) case, in this (fresh) process."""
    import torch

    from megamix.config import load_config
    from megamix.eval.generate import PREFILL_CHUNK
    from megamix.models import HybridModel

    torch.set_num_threads(threads)
    model = HybridModel(load_config(None, [*MODEL, f"model.pattern={pattern}"]).model, seed=0).eval()
    prompt = torch.randint(0, 4096, (1, length), generator=torch.Generator().manual_seed(0))
    baseline_mb = _rss_mb()
    state = model.initial_state(1, "cpu")
    start = time.perf_counter()
    for chunk in range(0, length, PREFILL_CHUNK):
        logits = model.extend(prompt[:, chunk:chunk + PREFILL_CHUNK], state)
    prefill_s = time.perf_counter() - start
    times = []
    for _ in range(WARMUP_TOKENS + decode):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        start = time.perf_counter()
        logits = model.extend(token, state)
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"prefill_tokens_per_s": length / prefill_s, "decode_ms_per_token": 1e3 * statistics.median(times[WARMUP_TOKENS:]),
            "decode_tokens_per_s": 1 / statistics.median(times[WARMUP_TOKENS:]),
            "state_mb": _state_bytes(state) / 2**20, "peak_rss_above_model_mb": peak_mb - baseline_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded per case (after 2 warm-up tokens)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: decoding a tiny model is latency-bound, and more threads "
                             "mostly add synchronisation noise)")
    args = parser.parse_args()
    lengths = [int(t) for t in args.lengths.split(",")]
    results: dict[str, dict[str, dict]] = {}
    context = multiprocessing.get_context("spawn")
    for name, pattern in PATTERNS.items():
        results[name] = {}
        for length in lengths:
            with context.Pool(1) as pool:  # a fresh process: its peak RSS is this case's
                results[name][str(length)] = pool.apply(measure, (pattern, length, args.decode, args.threads))
    short, long = str(lengths[0]), str(lengths[-1])
    flatness = {name: {key: by_length[long][key] / by_length[short][key] for key in ("decode_ms_per_token", "state_mb")}
                for name, by_length in results.items()}
    print(json.dumps({"benchmark": "generate", "machine": platform.node(), "threads": args.threads,
                      "lengths": lengths, "patterns": PATTERNS, "results": results, "flatness": flatness,
                      "target": "linear: decode_ms_per_token and state_mb flatness <= 1.1",
                      "target_met": all(v <= 1.1 for v in flatness["linear"].values())}, indent=1))


if __name__ == "__main__":
    main()
