"""``megamix convert``: Hugging Face ⇄ megamix checkpoints and megamix resharding (see docs/convert.md)."""

from __future__ import annotations

import argparse

# The conversions live in megamix.convert.directions; it is imported only when a conversion
# runs, so building the CLI parser does not load torch.distributed.checkpoint.
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
ARCHITECTURE_NAMES = ("LlamaForCausalLM", "MixtralForCausalLM", "Mamba2ForCausalLM", "NemotronHForCausalLM")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``megamix convert``."""
    parser.description = ("Convert checkpoints between Hugging Face (" + ", ".join(ARCHITECTURE_NAMES)
                          + ") and megamix, or reshard a megamix checkpoint for another layout.")
    parser.epilog = (
        "examples:\n"
        "  megamix convert hf-to-megamix ~/models/llama-1b runs/llama-1b/checkpoints parallel.tp=2 --verify\n"
        "  megamix train runs/llama-1b/checkpoints/step_0/config.yaml train.resume=runs/llama-1b/checkpoints/step_0\n"
        "  megamix convert megamix-to-hf runs/llama-1b/checkpoints exported/llama-1b --dtype bf16 --verify\n"
        "  megamix convert reshard runs/big/checkpoints runs/big-pp4/checkpoints parallel.pp=4 parallel.tp=1\n"
        "  megamix convert reshard runs/big/checkpoints runs/finetune/checkpoints --model-only"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("direction", choices=["hf-to-megamix", "megamix-to-hf", "reshard"])
    parser.add_argument("source", help="HF model directory (config.json + *.safetensors), or a megamix checkpoint "
                                       "(step_<N> or a checkpoint root with 'latest')")
    parser.add_argument("output", help="checkpoint root to write step_<N> into, or the HF directory to write")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="hf-to-megamix, reshard: the target's config, e.g. parallel.tp=2 parallel.pp=2 "
                             "(the model stays as it is; only the '|' stage marks of model.pattern may change)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES),
                        help="megamix-to-hf: tensor dtype to write (default: as stored in the checkpoint)")
    parser.add_argument("--architecture", choices=ARCHITECTURE_NAMES,
                        help="megamix-to-hf: the HF architecture to write (default: the first the model fits)")
    parser.add_argument("--shard-size", type=float, default=5.0, metavar="GB",
                        help="megamix-to-hf: largest safetensors shard in GiB (default 5; an index lists them)")
    parser.add_argument("--weights-only", action="store_true",
                        help="hf-to-megamix: write the model tensors alone, without the zero Adam moments and run "
                             "state train.resume needs (for export, eval, inspect; add them later with reshard "
                             "--model-only)")
    parser.add_argument("--model-only", action="store_true",
                        help="reshard: keep the weights only; the optimizer, step and data position start over")
    parser.add_argument("--verify", action="store_true",
                        help="hf-to-megamix, megamix-to-hf: run both models on the same random tokens; print max "
                             "|Δlogit| and KL (needs transformers)")


def run(args: argparse.Namespace) -> int:
    """Run ``megamix convert``; prints where the result went (and the agreement with --verify)."""
    import torch

    from megamix.convert.directions import hf_to_megamix, megamix_to_hf, reshard
    from megamix.errors import ConfigError

    if args.overrides and args.direction == "megamix-to-hf":
        raise ConfigError(f"megamix-to-hf takes no key=value overrides, got {' '.join(args.overrides)}")
    if args.verify and args.direction == "reshard":
        raise ConfigError("reshard copies the tensors bit for bit: --verify is for the HF directions")
    if args.weights_only and args.direction != "hf-to-megamix":
        raise ConfigError("--weights-only is for hf-to-megamix (reshard has --model-only)")
    if args.model_only and args.direction != "reshard":
        raise ConfigError("--model-only is for reshard (hf-to-megamix has --weights-only)")
    if args.direction == "hf-to-megamix":
        hf_dir, checkpoint = args.source, hf_to_megamix(args.source, args.output, args.overrides, args.weights_only)
        print(f"wrote {checkpoint}")
    elif args.direction == "megamix-to-hf":
        dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
        hf_dir = megamix_to_hf(args.source, args.output, dtype, args.architecture, int(args.shard_size * 2**30))
        checkpoint = args.source
        print(f"wrote {hf_dir}")
    else:
        print(f"wrote {reshard(args.source, args.output, args.overrides, args.model_only)}")
        return 0
    if args.verify:
        from megamix.convert.verify import compare

        print(f"verify: {compare(hf_dir, checkpoint)}")
    return 0
