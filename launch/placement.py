"""Reserving the job's resources: one placement group of nodes × procs bundles, with a bounded wait."""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from megamix.errors import ConfigError


def bundle_shape(device: str) -> dict[str, float]:
    """One rank's bundle: a GPU (and a CPU to drive it) when the cluster has GPUs, else a CPU."""
    if device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0:
        return {"CPU": 1.0, "GPU": 1.0}
    if device == "cuda":
        raise ConfigError("train.device=cuda but the Ray cluster has no GPUs; use train.device=auto or cpu")
    return {"CPU": 1.0}


def reserve(nodes: int, procs_per_node: int, shape: dict[str, float], strategy: str,
            timeout_s: float) -> PlacementGroup:
    """A ready placement group of ``nodes × procs_per_node`` bundles of ``shape``.

    Waits up to ``timeout_s`` (an autoscaler may be adding nodes), then raises a
    :class:`ConfigError` naming each resource that is short.
    """
    count = nodes * procs_per_node
    group = placement_group([dict(shape) for _ in range(count)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if ready:
        return group
    remove_placement_group(group)
    total, free = ray.cluster_resources(), ray.available_resources()
    short = ", ".join(f"{count * amount:g} {name} (cluster has {total.get(name, 0):g}, {free.get(name, 0):g} free)"
                      for name, amount in shape.items() if free.get(name, 0) < count * amount)
    alive = sum(1 for node in ray.nodes() if node["Alive"])
    raise ConfigError(f"the Ray cluster cannot host {count} ranks (--nodes {nodes} × --procs-per-node "
                      f"{procs_per_node}, --strategy {strategy}) after waiting {timeout_s:g} s "
                      f"(--resource-timeout): needs {short or 'bundles that fit on its ' + str(alive) + ' nodes'}; "
                      f"add nodes or lower --nodes / --procs-per-node")
