"""``megamix convert``: Hugging Face ``LlamaForCausalLM`` ↔ megamix checkpoints (see docs/convert.md)."""

from __future__ import annotations

import argparse

# The conversions live in megamix.convert.directions; it is imported only when a
# conversion runs, so building the CLI parser does not load torch.distributed.checkpoint.
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``megamix convert``."""
    parser.description = "Convert checkpoints between Hugging Face LlamaForCausalLM and megamix."
    parser.epilog = (
        "examples:\n"
        "  megamix convert hf-to-megamix ~/models/llama-1b runs/llama-1b/checkpoints --verify\n"
        "  megamix train runs/llama-1b/checkpoints/step_0/config.yaml train.resume=runs/llama-1b/checkpoints/step_0\n"
        "  megamix convert megamix-to-hf runs/llama-1b/checkpoints exported/llama-1b --dtype bf16"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("direction", choices=["hf-to-megamix", "megamix-to-hf"])
    parser.add_argument("source", help="HF model directory (config.json + *.safetensors), or a megamix checkpoint "
                                       "(step_<N> or a checkpoint root with 'latest')")
    parser.add_argument("output", help="checkpoint root to write step_0 into, or the HF directory to write")
    parser.add_argument("--dtype", choices=sorted(_DTYPES),
                        help="megamix-to-hf: tensor dtype to write (default: as stored in the checkpoint)")
    parser.add_argument("--verify", action="store_true",
                        help="run both models on the same random tokens; print max |Δlogit| and KL (needs transformers)")


def run(args: argparse.Namespace) -> int:
    """Run ``megamix convert``; prints where the result went (and the agreement with --verify)."""
    import torch

    from megamix.convert.directions import hf_to_megamix, megamix_to_hf

    if args.direction == "hf-to-megamix":
        hf_dir = args.source
        checkpoint = hf_to_megamix(args.source, args.output)
    else:
        hf_dir = megamix_to_hf(args.source, args.output, getattr(torch, _DTYPES[args.dtype]) if args.dtype else None)
        checkpoint = args.source
    print(f"wrote {checkpoint if args.direction == 'hf-to-megamix' else hf_dir}")
    if args.verify:
        from megamix.convert.verify import compare

        print(f"verify: {compare(hf_dir, checkpoint)}")
    return 0
