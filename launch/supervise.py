"""The driver's loop: run the job, and on a rank's failure restart every rank from the latest checkpoint."""

from __future__ import annotations

import sys
from typing import TextIO

from megamix.config import Config
from megamix.errors import TrainingError
from megamix_launch.group import RankGroup
from megamix_launch.options import LaunchOptions


def launch(config: Config, options: LaunchOptions, out: TextIO = sys.stdout) -> int:
    """Train ``config`` on the connected Ray cluster; returns how many restarts it took.

    A failed rank (exception, killed process, lost node) ends the attempt: every rank is
    torn down and the job starts again, resuming from the latest complete checkpoint
    (``train.resume=auto``), at most ``options.max_restarts`` times. A megamix error (bad
    config or data) is not retried. Ctrl-C asks the ranks to stop at a step boundary.
    """
    options.check(config)
    restart = None
    attempt = 0
    while True:
        group = RankGroup.start(config, options.nodes, options.procs_per_node, options.strategy,
                                options.resource_timeout_s, restart, out)
        try:
            failure = group.wait()
        except KeyboardInterrupt:
            print(f"[launch] stopping {options.world_size} ranks at the next step boundary", file=out, flush=True)
            group.stop(options.stop_timeout_s)
            raise
        finally:
            group.teardown()
        if failure is None:
            return attempt
        if failure.bad_input or attempt == options.max_restarts:
            left = "" if failure.bad_input else f" (no restarts left: --max-restarts {options.max_restarts})"
            raise TrainingError(f"{failure.reason}{left}; logs in {config.log.dir}/logs")
        attempt += 1
        restart = {"restart": attempt, "reason": failure.reason}
        print(f"[launch] {failure.reason}; restart {attempt} of {options.max_restarts} "
              f"from the latest checkpoint", file=out, flush=True)
