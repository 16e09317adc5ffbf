"""The ``megamix`` command line: ``megamix <command> --help`` explains each command."""

from __future__ import annotations

import argparse
import math
import os
import sys

from megamix.errors import MegamixError

_TRAIN_EXAMPLES = """examples:
  megamix train configs/tiny-dense.yaml
  megamix train configs/tiny-dense.yaml train.steps=50 train.lr=1e-3 log.dir=runs/try
  megamix train configs/tiny-dense.yaml model.pattern='*-*-*-' --dry-run

Overrides are dotted section.key=value pairs; values are read as YAML. With
train.resume=auto (the default) a run continues from <checkpoint.dir>/latest."""

_ESTIMATE_EXAMPLES = """examples:
  megamix estimate configs/mamba2-hybrid-8b.yaml --gpu h100 --nodes 8 --procs-per-node 8
  megamix estimate configs/llama-1b.yaml parallel.tp=2 train.recompute=true --gpu a100 --procs-per-node 8
  megamix estimate configs/mixtral-8x7b.yaml --gpu h200 --nodes 4 --procs-per-node 8 --search

Prints parameters, FLOPs per token per layer kind, memory per rank (weights, gradients, optimizer
state, activations, peak), step time, tokens/s and MFU; --search ranks every valid layout that fits
by estimated throughput. The model and its validation: docs/estimate.md."""

_INSPECT_EXAMPLES = """examples:
  megamix inspect runs/tiny-dense/checkpoints            # the latest checkpoint
  megamix inspect runs/tiny-dense/checkpoints/step_200 --tensors"""


def _train(args: argparse.Namespace) -> int:
    from megamix.config import load_config

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        import torch

        from megamix.models import HybridModel
        from megamix.parallel import check_layout

        p = config.parallel
        # under torchrun the real world size; alone, the smallest world the layout needs
        world = int(os.environ.get("WORLD_SIZE", p.tp * p.pp * p.cp * math.lcm(p.cp, p.ep) // p.cp))
        dp = check_layout(world, p.tp, p.pp, p.cp, p.ep)
        model = HybridModel(config.model, device=torch.device("meta"))
        print(config.to_yaml(), end="")
        print(f"# layout: world size {world} = pp {p.pp} × dp {dp} × cp {p.cp} × tp {p.tp}"
              f"{' (sequence parallel)' if p.sequence_parallel and p.tp > 1 else ''}; "
              f"{config.model.num_layers} layers '{config.model.pattern}'; "
              f"{model.num_parameters():,} parameters ({model.num_parameters(exclude_embeddings=True):,} "
              f"without embeddings); {model.flops_per_token(config.data.seq_len):.3e} training FLOPs/token")
        _print_run_estimate(config, world)
        return 0
    from megamix.train import train

    losses = train(config)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the job
        return 0
    if losses:
        print(f"trained to step {config.train.steps}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; run in {config.log.dir}")
    else:
        print(f"nothing to do: the checkpoint is already at step {config.train.steps}")
    return 0


def _print_run_estimate(config, world: int) -> None:
    """The planner's estimate for this run on this machine's device, as YAML comments."""
    from megamix.estimate import (
        Cluster,
        estimate,
        format_estimate,
        get_device,
        local_device,
    )

    device = local_device()
    if device is None:
        print("# estimate: unknown GPU; see megamix estimate CONFIG --gpu h100|h200|a100")
        return
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    try:
        text = format_estimate(estimate(config, Cluster(world // per_node, per_node), get_device(device)))
    except MegamixError as e:  # e.g. DeepSpeed's ZeRO-2/3, which the planner does not model
        text = f"estimate: not available: {e}"
    print("\n".join("# " + line for line in text.splitlines()))


def _estimate(args: argparse.Namespace) -> int:
    from megamix.config import load_config
    from megamix.estimate import (
        Cluster,
        estimate,
        format_estimate,
        format_search,
        get_device,
        search,
    )

    config = load_config(args.config, args.overrides)
    device = get_device(args.gpu)
    p = config.parallel
    if args.procs_per_node is not None:
        cluster = Cluster(1 if args.nodes is None else args.nodes, args.procs_per_node)
    else:  # the fewest ranks the layout needs, in nodes of (up to) 8 GPUs; all on this machine for the CPU
        world = p.tp * p.pp * p.cp * math.lcm(p.cp, p.ep) // p.cp
        per_node = world if device.shared_memory else math.gcd(world, device.per_node)
        cluster = Cluster(world // per_node if args.nodes is None else args.nodes, per_node)
    if not args.search:
        print(format_estimate(estimate(config, cluster, device)))
        return 0
    fitting, too_big = search(config, cluster, device)
    print(f"# {len(fitting) + too_big} valid layouts of '{config.model.pattern}' on {cluster.nodes} node(s) × "
          f"{cluster.procs_per_node} {device.name}; {too_big} do not fit in memory; best {min(args.top, len(fitting))} "
          f"by estimated tokens/s (mb: micro-batch size, rc: recompute)")
    if not fitting:
        print("no layout fits: use more devices, a shorter data.seq_len or a smaller model")
        return 1
    print(format_search(fitting, args.top))
    print(f"\nbest layout:\n{format_estimate(fitting[0])}")
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from megamix.data import prepare

    return prepare.run(args)


def _convert(args: argparse.Namespace) -> int:
    from megamix import convert

    return convert.run(args)


def _eval(args: argparse.Namespace) -> int:
    from megamix.eval import cli

    return cli.run(args)


def _launch(args: argparse.Namespace) -> int:
    from megamix_launch import cli

    return cli.run(args)


def _inspect(args: argparse.Namespace) -> int:
    from megamix.checkpoint.inspect import describe_checkpoint

    print(describe_checkpoint(args.checkpoint, tensors=args.tensors))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamix", description=__doc__.split(":")[0] + ".")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train in this process (or under torchrun)", epilog=_TRAIN_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="YAML config, e.g. configs/tiny-dense.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=10")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and layout, do not train")
    train.set_defaults(handler=_train)

    from megamix.data import prepare

    data = commands.add_parser("prepare-data", help="tokenize text files into packed token files",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_arguments(data)
    data.set_defaults(handler=_prepare_data)

    from megamix import convert

    conversion = commands.add_parser("convert", help="convert Hugging Face checkpoints (Llama, Mixtral, Mamba-2, "
                                                     "Nemotron-H) to megamix and back; reshard megamix checkpoints")
    convert.add_arguments(conversion)
    conversion.set_defaults(handler=_convert)

    from megamix.eval import cli as eval_cli

    evaluation = commands.add_parser("eval", help="long-context evaluation: retrieval suite, perplexity by length")
    eval_cli.add_arguments(evaluation)
    evaluation.set_defaults(handler=_eval)

    from megamix_launch import cli as launch_cli

    launch = commands.add_parser("launch", help="train on a Ray cluster or an embedded local Ray; restarts on failure",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    launch_cli.add_arguments(launch)
    launch.set_defaults(handler=_launch)

    plan = commands.add_parser("estimate", help="plan memory, FLOPs and step time of a config on a cluster",
                               epilog=_ESTIMATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("config", help="YAML config, e.g. configs/mamba2-hybrid-8b.yaml")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. parallel.tp=8")
    plan.add_argument("--gpu", default="h100", help="device: h100 (default), h200, a100 or cpu (this dev VM)")
    plan.add_argument("--nodes", type=int, help="nodes (default: as many as the layout needs)")
    plan.add_argument("--procs-per-node", type=int,
                      help="ranks per node, one device each (default: the fewest ranks the config's layout needs, "
                           "in nodes of 8 GPUs)")
    plan.add_argument("--search", action="store_true", help="rank every valid layout that fits by tokens/s")
    plan.add_argument("--top", type=int, default=15, help="rows of the --search table (default 15)")
    plan.set_defaults(handler=_estimate)

    inspect = commands.add_parser("inspect", help="summarize a checkpoint", epilog=_INSPECT_EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("checkpoint", help="a checkpoint directory (step_<N>) or a checkpoint root with 'latest'")
    inspect.add_argument("--tensors", action="store_true", help="list every stored tensor with shape and norm")
    inspect.set_defaults(handler=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting key=value overrides at the first flag; take the ones after it too
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra
    try:
        return args.handler(args)
    except MegamixError as e:
        print(f"megamix {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megamix {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
