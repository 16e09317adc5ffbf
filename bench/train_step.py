"""Training-step throughput of megamix's HybridModel against transformers' LlamaForCausalLM.

Both models have the identical dense shape and run the identical step (forward,
next-token cross-entropy, backward, AdamW) on the same batch; their steps
alternate, first one model first and then the other, so that load from other
processes hits both alike. Prints one JSON object with
tokens/s (median over the timed steps, warmup excluded) per model and precision,
and the ratio megamix / transformers.

    python bench/train_step.py --steps 10 --seq-len 512 --batch 4 --precision both
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers

from megamix.config import ModelConfig
from megamix.models import HybridModel

MODEL = ModelConfig(pattern="*-*-*-*-", vocab_size=4096, hidden_size=512, num_heads=8, num_kv_heads=4)


def llama_like(cfg: ModelConfig) -> transformers.LlamaForCausalLM:
    """HF Llama with cfg's shape: one decoder layer per ``*-`` pair of the pattern (no KV cache: training)."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers // 2, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa", use_cache=False,
    ))


class StepTimer:
    """One model with its optimiser; ``step`` returns the seconds a full training step took."""

    def __init__(self, model: torch.nn.Module, logits_of: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]):
        self.model = model.train()
        self.logits_of = logits_of
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self, tokens: torch.Tensor, precision: str) -> float:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        start = time.perf_counter()
        with autocast:
            logits = self.logits_of(self.model, tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def measure(precision: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    timers = {
        "megamix": StepTimer(HybridModel(MODEL), lambda model, tokens: model(tokens)),
        "transformers": StepTimer(llama_like(MODEL), lambda model, tokens: model(tokens).logits),
    }
    tokens = torch.randint(0, MODEL.vocab_size, (args.batch, args.seq_len + 1))
    times: dict[str, list[float]] = {name: [] for name in timers}
    for step in range(args.warmup + args.steps):
        order = list(timers.items())[:: 1 if step % 2 else -1]  # neither model always runs second
        for name, timer in order:
            seconds = timer.step(tokens, precision)
            if step >= args.warmup:
                times[name].append(seconds)
    tokens_per_s = {name: args.batch * args.seq_len / statistics.median(t) for name, t in times.items()}
    return {**{f"{name}_tokens_per_s": round(v, 1) for name, v in tokens_per_s.items()},
            "ratio": round(tokens_per_s["megamix"] / tokens_per_s["transformers"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model and precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    args = parser.parse_args()
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    result = {
        "model": dataclasses.asdict(MODEL),
        "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
    }
    for precision in precisions:
        result[precision] = measure(precision, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
