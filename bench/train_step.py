"""Training-step throughput of megamix's HybridModel against transformers' LlamaForCausalLM.

Both models have the identical dense shape and each runs one full training step
the way its users train, on the same batch:

- megamix as its trainer runs it (``megamix.train.Trainer.train_step``): logits,
  ``vocab_parallel_cross_entropy(...).mean()``, backward, then the
  ``DistributedOptimizer``'s ``reduce_gradients``, ``clip_grad_norm(1.0)``,
  ``step`` (fused AdamW) and ``zero_grad``, with the trainer's default hyperparameters;
- transformers as HF Trainer runs it: ``model(input_ids, labels=input_ids).loss``
  (HF's own shifted loss), backward, ``torch.nn.utils.clip_grad_norm_(…, 1.0)``
  (``max_grad_norm``), and the default optimizer ``adamw_torch_fused``:
  ``torch.optim.AdamW(fused=True)`` with TrainingArguments' defaults.

Both see ``seq_len`` input tokens per sequence. Their steps alternate, first one
model first and then the other, so that load from other processes hits both
alike. Prints one JSON object with tokens/s (median over the timed steps, warmup
excluded) per model and precision, and the ratio megamix / transformers.

    python bench/train_step.py --steps 10 --seq-len 512 --batch 4 --precision both
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
import time

import torch
import transformers

from megamix.config import ModelConfig, TrainConfig
from megamix.models import HybridModel
from megamix.parallel import DistributedOptimizer, ParallelState, vocab_parallel_cross_entropy

MODEL = ModelConfig(pattern="*-*-*-*-", vocab_size=4096, hidden_size=512, num_heads=8, num_kv_heads=4)
MAX_GRAD_NORM = 1.0  # megamix's train.grad_clip and HF TrainingArguments.max_grad_norm


def llama_like(cfg: ModelConfig) -> transformers.LlamaForCausalLM:
    """HF Llama with cfg's shape: one decoder layer per ``*-`` pair of the pattern (no KV cache: training)."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers // 2, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa", use_cache=False,
    ))


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


class MegamixStep:
    """``Trainer.train_step`` for one micro-batch in one process: tokens ``[batch, seq + 1]``."""

    def __init__(self):
        t = TrainConfig()
        self.model = HybridModel(MODEL).train()
        self.optimizer = DistributedOptimizer(self.model.named_parameters(), ParallelState.single(), lr=t.lr,
                                              betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)

    def __call__(self, tokens: torch.Tensor, precision: str) -> None:
        with autocast(precision):
            logits = self.model(tokens[:, :-1])
        vocab_parallel_cross_entropy(logits, tokens[:, 1:]).mean().backward()
        self.optimizer.reduce_gradients()
        self.optimizer.clip_grad_norm(MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad()


class TransformersStep:
    """HF Trainer's step on ``input_ids = labels = tokens[:, :-1]``: the model shifts the labels itself."""

    def __init__(self):
        self.model = llama_like(MODEL).train()
        # TrainingArguments defaults: optim="adamw_torch_fused", lr 5e-5, betas (0.9, 0.999), eps 1e-8, no decay
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-5, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0, fused=True)

    def __call__(self, tokens: torch.Tensor, precision: str) -> None:
        input_ids = tokens[:, :-1]
        with autocast(precision):
            loss = self.model(input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)


def measure(precision: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    steps = {"megamix": MegamixStep(), "transformers": TransformersStep()}
    tokens = torch.randint(0, MODEL.vocab_size, (args.batch, args.seq_len + 1))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in list(steps.items())[:: 1 if i % 2 else -1]:  # neither model always runs second
            start = time.perf_counter()
            step(tokens, precision)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
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
