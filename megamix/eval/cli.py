"""``megamix eval MODEL --suite ... --lengths ...``: the long-context suite on a checkpoint or HF directory."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  megamix eval runs/tiny-hybrid/checkpoints --suite passkey niah --lengths 256 512 1024
  megamix eval runs/tiny-hybrid/checkpoints --suite all --lengths 512 2048 --tokens data/heldout --out runs/eval
  megamix eval ~/models/tiny-llama --suite ruler --lengths 1024 4096 --samples 10
  torchrun --nproc-per-node 4 -m megamix eval CKPT --suite perplexity --lengths 65536 --cp 2 --tp 2 --tokens data/heldout

Suites: all, ruler (niah_multikey, niah_multivalue, niah_multiquery, variable_tracking, common_words,
frequent_words), phonebooks (phonebook, phonebook_reversed), or single tasks: passkey, niah, phonebook,
phonebook_reversed, perplexity, and the ruler tasks. Results: OUT/results.json (every sample, the summary)
and PNG plots; a rerun with the same OUT skips finished cells. See docs/eval.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Evaluate long-context abilities: synthetic retrieval tasks and perplexity by length."
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", help="megamix checkpoint (step_<N> or a root with 'latest') or HF model directory")
    parser.add_argument("--suite", nargs="+", default=["all"], help="suites or tasks (default: all)")
    parser.add_argument("--lengths", nargs="+", type=int, required=True, help="context lengths in tokens")
    parser.add_argument("--out", default="runs/eval", help="directory for results.json and plots (default: runs/eval)")
    parser.add_argument("--samples", type=int, default=5, help="samples per cell (perplexity: windows; default 5)")
    parser.add_argument("--depths", nargs="+", type=float, default=None,
                        help="needle depths in [0, 1] for the niah grid (default 0 0.25 0.5 0.75 1)")
    parser.add_argument("--tokens", help="held-out tokens for perplexity: PREFIX of PREFIX.bin/.idx, or a text file")
    parser.add_argument("--tokenizer", help="a sentencepiece .model to use instead of the model's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts (or windows) per forward (default 4)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun)")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size (under torchrun; perplexity)")


def run(args: argparse.Namespace) -> int:
    import torch

    from megamix.errors import ConfigError
    from megamix.eval.loading import load_for_eval
    from megamix.eval.runner import DEPTHS, SuiteSettings, run_suite
    from megamix.eval.tasks import resolve_suite
    from megamix.parallel import ParallelState
    from megamix.parallel.state import init_distributed

    tasks = resolve_suite(args.suite)
    depths = tuple(args.depths) if args.depths else DEPTHS
    if args.samples < 1 or args.batch_size < 1 or any(not 0 <= d <= 1 for d in depths):
        raise ConfigError("--samples and --batch-size must be at least 1, --depths within [0, 1]")
    init_distributed(torch.device("cpu"))
    parallel = ParallelState.create(tp=args.tp, cp=args.cp)
    em = load_for_eval(args.model, args.tokenizer, parallel)
    settings = SuiteSettings(seed=args.seed, samples=args.samples, depths=depths, tokens=args.tokens,
                             batch_size=args.batch_size)
    table = run_suite(em, tasks, sorted(set(args.lengths)), args.out, settings, parallel)
    if parallel.rank == 0:
        print(table)
        print(f"results in {args.out}/results.json")
    return 0
