"""``megamix launch``: train a config on a Ray cluster (or an embedded local Ray), restarting on failure."""

from __future__ import annotations

import argparse
import os
import signal
import sys

_EXAMPLES = """examples:
  megamix launch configs/tiny-dense.yaml --procs-per-node 2            # embedded local Ray
  megamix launch configs/tiny-dense.yaml parallel.tp=2 --address auto --nodes 2 --procs-per-node 8
  ray job submit -- megamix launch configs/tiny-dense.yaml --nodes 4 --procs-per-node 8

Each rank is a Ray actor that runs the same entry as `megamix train`; its output goes to
<log.dir>/logs/rank_<r>.log. When a rank dies, all ranks restart from the latest
checkpoint (at most --max-restarts times); each restart is recorded in <log.dir>/metrics.jsonl.
See docs/launch.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``megamix launch``."""
    parser.description = __doc__.split("``: ")[1]
    parser.epilog = _EXAMPLES
    parser.add_argument("config", help="YAML config, e.g. configs/tiny-dense.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=10")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes to spread the ranks over (default 1)")
    parser.add_argument("--procs-per-node", type=int, default=1, help="ranks per node, one GPU each (default 1)")
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="restarts from the latest checkpoint after a rank fails (default 3; 0 fails fast)")
    parser.add_argument("--strategy", default="PACK", choices=["PACK", "SPREAD"],
                        help="placement-group strategy for the rank bundles (default PACK)")
    parser.add_argument("--resource-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the cluster's resources before giving up (default 60)")
    parser.add_argument("--stop-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="on Ctrl-C/SIGTERM, how long ranks get to finish the step (and save) (default 60)")


def warn_if_out_of_memory(config, options, address: str | None) -> None:
    """Print the planner's warning (docs/estimate.md) when a rank would run out of device memory. The
    device is this driver's GPU; a driver without one checks only an embedded local Ray on this CPU."""
    from megamix.estimate import Cluster, get_device, local_device, memory_warning

    device = local_device()
    if device is None or (device == "cpu" and (address or config.train.device == "cuda")):
        return  # the ranks' devices are not known here
    warning = memory_warning(config, Cluster(options.nodes, options.procs_per_node), get_device(device))
    if warning:
        print(f"megamix launch: warning: {warning}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run ``megamix launch``; prints a one-line summary."""
    from megamix.config import load_config
    from megamix.errors import ConfigError
    from megamix_launch.connect import connect, disconnect
    from megamix_launch.options import LaunchOptions

    config = load_config(args.config, args.overrides)
    options = LaunchOptions(args.nodes, args.procs_per_node, args.max_restarts, args.strategy,
                            args.resource_timeout, args.stop_timeout)
    options.check(config)
    address = args.address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets RAY_ADDRESS
    warn_if_out_of_memory(config, options, address)
    if args.nodes > 1 and not address:
        raise ConfigError(f"--nodes {args.nodes}: an embedded local Ray has one node; pass --address of a cluster")
    temp_dir = connect(address, options.world_size)
    try:
        from megamix_launch.supervise import launch  # imports Ray: only after connect() set its environment

        signal.signal(signal.SIGTERM, signal.default_int_handler)  # after ray.init, which sets its own
        restarts = launch(config, options)
    finally:
        disconnect(temp_dir)
    print(f"trained to step {config.train.steps} on {options.world_size} ranks with {restarts} restart(s); "
          f"run in {config.log.dir}")
    return 0
