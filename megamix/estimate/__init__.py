"""The planner behind ``megamix estimate``: parameters, FLOPs, memory per rank and step time of a
config on a cluster, before anything launches (docs/estimate.md).

    estimate(config, Cluster(nodes, procs_per_node), get_device("h100"))  → Estimate
    search(config, cluster, device)                                        → layouts that fit, best first
"""

from megamix.estimate.plan import Estimate, estimate, memory_warning
from megamix.estimate.hardware import DEVICES, Device, get_device, local_device
from megamix.estimate.layout import Cluster, Layout, layout_of
from megamix.estimate.report import format_estimate, format_search
from megamix.estimate.search import search

__all__ = ["DEVICES", "Cluster", "Device", "Estimate", "Layout", "estimate", "format_estimate", "format_search",
           "get_device", "layout_of", "local_device", "memory_warning", "search"]
