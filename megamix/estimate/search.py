"""``--search``: every valid layout of a config on a cluster, ranked by estimated throughput within memory."""

from __future__ import annotations

import itertools

from megamix.config import Config, validate
from megamix.errors import ConfigError
from megamix.estimate.plan import Estimate, estimate
from megamix.estimate.hardware import Device
from megamix.estimate.layout import Cluster, Layout, apply_layout, layout_of

MAX_MICRO_BATCH = 8


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(config: Config, cluster: Cluster) -> list[Layout]:
    """Layouts the config and cluster allow: tp within a node, every split the config validation and
    the pipeline cut accept, sequence parallelism whenever tp > 1, micro-batches of 1 … 8 samples, with
    and without recompute, experts split over ep only with MoE layers."""
    world, c = cluster.world_size, config.model
    layouts = []
    for tp, pp, cp in itertools.product(_divisors(cluster.procs_per_node), _divisors(world), _divisors(world)):
        if world % (tp * pp * cp):
            continue
        dp = world // (tp * pp * cp)
        eps = [e for e in _divisors(dp * cp) if c.moe.num_experts % e == 0] if "E" in c.pattern else [1]
        for ep, vpp, micro, recompute in itertools.product(eps, (1, 2), _divisors(MAX_MICRO_BATCH), (False, True)):
            if vpp > 1 and pp == 1:
                continue
            layout = Layout(tp, pp, vpp, cp, ep, dp, tp > 1, config.parallel.zero, micro, 0, recompute)
            try:
                candidate = apply_layout(config, layout)
                validate(candidate)
                layouts.append(layout_of(candidate, world))
            except ConfigError:
                continue
    return layouts


def search(config: Config, cluster: Cluster, device: Device) -> tuple[list[Estimate], int]:
    """(estimates of the layouts that fit, best tokens/s first; how many valid layouts did not fit)."""
    fitting, too_big = [], 0
    for layout in candidate_layouts(config, cluster):
        try:
            result = estimate(apply_layout(config, layout), cluster, device, layout)
        except ConfigError:  # e.g. fewer layers than pipeline stages
            continue
        if result.fits:
            fitting.append(result)
        else:
            too_big += 1
    fitting.sort(key=lambda e: -e.time.tokens_per_s)
    return fitting, too_big
