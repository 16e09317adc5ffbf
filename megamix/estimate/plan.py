"""The plan for one config on one cluster: parameters, FLOPs, memory per rank, step time."""

from __future__ import annotations

from dataclasses import dataclass

from megamix.config import Config
from megamix.estimate.hardware import Device, GiB
from megamix.estimate.layout import Cluster, Layout, layout_of
from megamix.estimate.memory import RankMemory, rank_memory
from megamix.estimate.parameters import total_parameters
from megamix.estimate.stages import layer_forward_flops, pipeline_ranks
from megamix.estimate.throughput import StepTime, step_time


@dataclass(frozen=True)
class Estimate:
    """``flops_by_kind[kind]`` = (layers of that kind, forward FLOPs per token of one);
    ``training_flops_per_token`` = 3 × (Σ layers + LM head), the model's own count.
    ``memory`` has one entry per pipeline rank."""

    config: Config
    layout: Layout
    cluster: Cluster
    device: Device
    total_parameters: int
    active_parameters: int
    flops_by_kind: dict[str, tuple[int, int]]
    head_flops: int
    training_flops_per_token: int
    memory: list[RankMemory]
    time: StepTime

    @property
    def peak(self) -> RankMemory:
        """The pipeline rank with the highest peak."""
        return max(self.memory, key=lambda m: m.peak)

    @property
    def fits(self) -> bool:
        return self.peak.peak <= self.device.memory_per_rank(self.cluster.procs_per_node)


def estimate(config: Config, cluster: Cluster, device: Device, layout: Layout | None = None) -> Estimate:
    """Estimate ``config`` on ``cluster`` (at ``layout``, default the config's own)."""
    layout = layout or layout_of(config, cluster.world_size)
    c, seq = config.model, config.data.seq_len
    forward = layer_forward_flops(c, seq)
    kinds = c.pattern.replace("|", "")
    by_kind = {kind: (kinds.count(kind), flops) for kind, flops in zip(kinds, forward)}
    head = 2 * c.hidden_size * c.vocab_size
    training = 3 * (sum(forward) + head)
    ranks = pipeline_ranks(c, seq, layout.pp, layout.vpp)
    memory = [rank_memory(config, layout, stages) for stages in ranks]
    total, active = total_parameters(c)
    return Estimate(config, layout, cluster, device, total, active, by_kind, head, training, memory,
                    step_time(config, layout, cluster, device, ranks, training))


def memory_warning(config: Config, cluster: Cluster, device: Device) -> str | None:
    """A warning when ``config`` would run out of device memory on ``cluster``, else None (also for a
    DeepSpeed run, which the estimate does not model)."""
    if config.parallel.zero_engine != "builtin":
        return None
    e = estimate(config, cluster, device)
    if e.fits:
        return None
    budget = device.memory_per_rank(cluster.procs_per_node)
    return (f"estimated peak memory {e.peak.peak / GiB:.1f} GiB per rank (pipeline rank {e.peak.rank}) exceeds "
            f"the {budget / GiB:.1f} GiB of a {device.name} rank; try train.recompute=true, a smaller "
            f"train.micro_batch_size or more parallelism (`megamix estimate CONFIG --search` ranks layouts "
            f"that fit)")
