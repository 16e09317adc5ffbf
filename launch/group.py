"""One attempt of a job: a placement group, one worker actor per rank, and their training runs."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import ray
from ray.exceptions import RayError, RayTaskError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from megamix.config import Config
from megamix.errors import MegamixError
from megamix_launch.logs import LogStream
from megamix_launch.placement import bundle_shape, reserve
from megamix_launch.ranks import Placement, assign_ranks
from megamix_launch.worker import RankWorker

_Worker = ray.remote(RankWorker)
_POLL_S = 0.5  # how often the driver looks at the runs and pulls logs


@dataclass(frozen=True)
class Failure:
    """Why an attempt ended early. ``bad_input``: a megamix error (config, data, checkpoint) that
    a restart would only repeat."""

    reason: str
    bad_input: bool = False


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def describe_failure(rank: int, error: RayError) -> Failure:
    """One line for the driver, the restart record and the final error."""
    if isinstance(error, RayTaskError):
        cause = error.cause
        return Failure(f"rank {rank} raised {type(cause).__name__}: {_first_line(str(cause))}",
                       isinstance(cause, MegamixError))
    return Failure(f"rank {rank} died: {_first_line(str(error))}")


class RankGroup:
    """The workers of one attempt, by rank; :meth:`start` places them and starts training."""

    def __init__(self, placement_group, workers: list, runs: list, out: TextIO):
        self._placement_group = placement_group
        self.workers = workers  # actor handles by rank
        self._runs = runs  # ObjectRefs of RankWorker.run, by rank
        self._logs = LogStream(workers, out)

    @classmethod
    def start(cls, config: Config, nodes: int, procs_per_node: int, strategy: str, resource_timeout_s: float,
              restart: dict[str, Any] | None = None, out: TextIO = sys.stdout) -> RankGroup:
        """Reserve the bundles, start one worker in each, order them into ranks and start training."""
        shape = bundle_shape(config.train.device)
        group = reserve(nodes, procs_per_node, shape, strategy, resource_timeout_s)
        workers = [_Worker.options(num_cpus=shape["CPU"], num_gpus=shape.get("GPU", 0), max_concurrency=3,
                                   scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote(os.getcwd())
                   for i in range(nodes * procs_per_node)]
        try:
            # The address each node registered with (127.0.0.1 for the embedded Ray), not a guess from inside.
            addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
            placements = [Placement(addresses[node_id], node_id, gpus)
                          for node_id, gpus in ray.get([w.location.remote() for w in workers])]
            slots = assign_ranks(placements)
            master = workers[slots[0].worker]
            master_addr, master_port = placements[slots[0].worker].ip, ray.get(master.free_port.remote())
        except BaseException:
            cls(group, workers, [], out).teardown()
            raise
        runs = []
        for slot in slots:
            env = {"RANK": str(slot.rank), "WORLD_SIZE": str(len(slots)), "LOCAL_RANK": str(slot.local_rank),
                   "LOCAL_WORLD_SIZE": str(slot.local_world_size), "MASTER_ADDR": master_addr,
                   "MASTER_PORT": str(master_port)}
            if slot.node_gpus:  # Ray shows each actor only its own GPU; cuda:LOCAL_RANK must be that one
                env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.node_gpus)
            runs.append(workers[slot.worker].run.remote(env, config.to_dict(), restart if slot.rank == 0 else None))
        return cls(group, [workers[slot.worker] for slot in slots], runs, out)

    def wait(self) -> Failure | None:
        """Stream logs until every rank has finished (None) or the first one fails."""
        pending = list(self._runs)
        while pending:
            done, pending = ray.wait(pending, timeout=_POLL_S)
            self._logs.poll()
            for ref in done:
                try:
                    ray.get(ref)
                except RayError as error:
                    return describe_failure(self._runs.index(ref), error)
        return None

    def stop(self, timeout_s: float) -> None:
        """Ask every rank to end at the next step boundary and wait up to ``timeout_s`` for them."""
        for worker in self.workers:
            worker.request_stop.remote()
        ray.wait(self._runs, num_returns=len(self._runs), timeout=timeout_s)
        self._logs.poll()

    def teardown(self) -> None:
        """Kill every worker and release the bundles (a rank stuck in a collective never returns by itself)."""
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        remove_placement_group(self._placement_group)
