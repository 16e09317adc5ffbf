"""Rank order: by node IP, then by node, then by GPU and bundle on the node; stable across restarts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """Where one worker landed, as it reports itself."""

    ip: str
    node_id: str
    gpu_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Slot:
    """The torchrun-style coordinates of one worker."""

    worker: int  # index into the list of placements
    rank: int
    local_rank: int
    local_world_size: int
    node_gpus: tuple[str, ...]  # the GPUs of every rank on this node, in local-rank order


def assign_ranks(placements: list[Placement]) -> list[Slot]:
    """Slots ordered by rank. Ranks on one node are contiguous, so tp groups stay inside a node."""
    def key(i: int):
        p = placements[i]
        address = ipaddress.ip_address(p.ip)
        return address.version, int(address), p.node_id, p.gpu_ids, i

    order = sorted(range(len(placements)), key=key)
    by_node: dict[str, list[int]] = {}
    for i in order:
        by_node.setdefault(placements[i].node_id, []).append(i)
    slots = []
    for rank, i in enumerate(order):
        local = by_node[placements[i].node_id]
        node_gpus = tuple(gpu for j in local for gpu in placements[j].gpu_ids)
        slots.append(Slot(i, rank, local.index(i), len(local), node_gpus))
    return slots
