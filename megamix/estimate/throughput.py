"""Step time, throughput and MFU from the device peak and a communication model.

Per micro-batch on pipeline rank r (the slowest sets the pace):

    compute   FLOPs / (peak · matmul_efficiency): 3 × the forward FLOPs of the rank's layers (4 × with
              recompute) on its micro_batch · seq_len / (tp · cp) tokens, the forward FLOPs being the
              layers' own ``flops_per_token`` (attention counted over all seq_len keys)
    tp        ring all-reduce (or its all-gather + reduce-scatter pair under SP: the same bytes),
              2(t − 1)/t · micro_batch · seq/cp · hidden · dtype bytes, once forward and once backward per
              layer (again in the recomputed forward), plus the embedding's and the LM head's; exposed
    cp        softmax layers: ring attention sends the local K/V cp − 1 times forward and K/V with fp32
              dK/dV backward, overlapped with that layer's attention products (only the excess counts);
              Lightning/Mamba-2: one all-gather of the chunk states forward, one reduce-scatter backward
    ep        4 all-to-alls per MoE layer (dispatch, combine; forward and backward) of top_k · tokens ·
              hidden, (ep − 1)/ep of it leaving the rank
    pp        each stage boundary sends the activations forward and their gradient back

    step      = micro_batches · (slowest rank's micro-batch) / (1 − bubble)
                + dp gradient reduce-scatter and parameter all-gather (fp32, 2(n − 1)/n · bytes; the same
                  for an all-reduce without ZeRO) + the AdamW step (28 B per updated element / memory bw)
    bubble    = (pp − 1) / (vpp · m + pp − 1)   (the idle fraction of the schedule)

Every collective also pays ``latency_us``. A group inside one node uses NVLink bandwidth, one that
spans nodes the per-GPU network bandwidth (rank order: tp, cp, dp, pp).
"""

from __future__ import annotations

from dataclasses import dataclass

from megamix.config import Config
from megamix.estimate.hardware import Device
from megamix.estimate.layout import Cluster, Layout
from megamix.estimate.memory import rank_tensors
from megamix.estimate.parameters import rank_parameters
from megamix.estimate.stages import RankStages, layer_forward_flops


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step and their parts (per micro-batch parts on the slowest pipeline rank)."""

    compute: float  # per micro-batch
    tp: float
    cp: float
    ep: float
    pp: float
    bubble: float  # fraction of the pipeline time
    dp: float  # per step
    optimizer: float  # per step
    step: float
    tokens_per_s: float
    mfu: float


def _ring(bytes_: float, size: int, gbps: float, device: Device) -> float:
    """Seconds of a ring all-reduce-sized transfer: 2(n − 1)/n · bytes (all-gather + reduce-scatter)."""
    if size <= 1:
        return 0.0
    return 2 * (size - 1) / size * bytes_ / (gbps * 1e9) + device.latency_us * 1e-6


class CommModel:
    """Bandwidth of each group of ``layout`` on ``cluster`` of ``device``."""

    def __init__(self, layout: Layout, cluster: Cluster, device: Device):
        self.layout, self.cluster, self.device = layout, cluster, device

    def gbps(self, dim: str, size: int) -> float:
        crosses = self.layout.crosses_nodes(dim, size, self.cluster)
        return self.device.inter_node_gbps if crosses else self.device.intra_node_gbps

    def collective(self, dim: str, size: int, bytes_: float) -> float:
        return _ring(bytes_, size, self.gbps(dim, size), self.device)

    def send(self, dim: str, size: int, bytes_: float) -> float:
        return bytes_ / (self.gbps(dim, size) * 1e9) + self.device.latency_us * 1e-6


def micro_batch_seconds(config: Config, layout: Layout, stages: RankStages, comm: CommModel,
                        device: Device, forward_flops: list[int]) -> tuple[float, float, float, float, float]:
    """(compute, tp, cp, ep, pp) seconds of one micro-batch on pipeline rank ``stages``."""
    c, seq = config.model, config.data.seq_len
    precision = config.train.precision
    dtype_bytes = 2 if precision == "bf16" else 4
    kinds = c.pattern.replace("|", "")
    flops = dict(zip(kinds, forward_flops))  # one value per kind: equal for layers of one kind
    passes = 4 if layout.recompute else 3
    layer_flops = sum(flops[k] for k in stages.kinds) + (2 * c.hidden_size * c.vocab_size if stages.last else 0)
    tokens = layout.micro_batch * seq / layout.cp  # per cp rank; split over tp in work
    speed = device.peak_flops(precision) * device.matmul_efficiency
    compute = passes * layer_flops * tokens / layout.tp / speed

    activation = tokens * c.hidden_size * dtype_bytes
    forwards = 2 if layout.recompute else 1
    tp_calls = len(stages.kinds) * (forwards + 1) + stages.first + stages.last
    tp_time = tp_calls * comm.collective("tp", layout.tp, activation)

    cp_time = 0.0
    if layout.cp > 1:
        kv_elements = tokens * 2 * max(c.num_kv_heads // layout.tp, 1) * c.head_dim
        attention_core = 3 * 4 * c.num_heads * c.head_dim * seq * tokens / layout.tp / speed
        # K/V forward, K/V again with their fp32 dK/dV backward, from each of the cp − 1 other ranks
        ring = comm.send("cp", layout.cp, (layout.cp - 1) * kv_elements * (2 * dtype_bytes + 4))
        for kind in stages.kinds:
            if kind in "*H":
                cp_time += max(0.0, ring - attention_core)
            elif kind in "LM":
                heads, key, value = ((c.num_heads, c.head_dim, c.head_dim) if kind == "L" else
                                     (c.mamba.num_heads, c.mamba.state_size, c.mamba.head_dim))
                states = 2 * layout.micro_batch * heads / layout.tp * key * value * 4
                cp_time += 2 * comm.collective("cp", layout.cp, states * layout.cp / 2)

    ep_time = 0.0
    if layout.ep > 1 and "E" in stages.kinds:
        moved = c.moe.top_k * tokens * c.hidden_size * dtype_bytes * (layout.ep - 1) / layout.ep
        ep_time = stages.kinds.count("E") * 4 * comm.send("ep", layout.ep, moved)

    pp_time = 0.0
    if layout.pp > 1:
        boundary = activation / (layout.tp if layout.sp else 1)
        pp_time = 2 * layout.vpp * comm.send("pp", layout.pp, boundary)
    return compute, tp_time, cp_time, ep_time, pp_time


def step_time(config: Config, layout: Layout, cluster: Cluster, device: Device,
              ranks: list[RankStages], model_flops_per_token: int) -> StepTime:
    comm = CommModel(layout, cluster, device)
    forward_flops = layer_forward_flops(config.model, config.data.seq_len)
    per_rank = [micro_batch_seconds(config, layout, stages, comm, device, forward_flops) for stages in ranks]
    slowest = max(per_rank, key=sum)
    m = layout.micro_batches
    bubble = (layout.pp - 1) / (layout.vpp * m + layout.pp - 1)
    pipeline = m * sum(slowest) / (1 - bubble)

    params = rank_parameters(config.model, layout.tp, layout.ep)
    tensors = [rank_tensors(params, stages, config.model.tie_embeddings) for stages in ranks]
    dense = max(sum(t.numel for t in rank if not t.expert) for rank in tensors)
    experts = max(sum(t.numel for t in rank if t.expert) for rank in tensors)
    dp_time = comm.collective("grad", layout.grad_group, 4 * dense)
    if experts:
        dp_time += comm.collective("expert_dp", layout.grad_group // layout.ep, 4 * experts)
    shards = layout.grad_group if layout.zero == 1 else 1
    optimizer = 28 * (dense / shards + experts * layout.ep / shards) / (device.memory_gbps * 1e9)

    step = pipeline + dp_time + optimizer
    tokens = config.train.global_batch_size * config.data.seq_len
    tokens_per_s = tokens / step
    mfu = model_flops_per_token * tokens_per_s / (layout.world_size * device.peak_flops(config.train.precision))
    return StepTime(*slowest, bubble, dp_time, optimizer, step, tokens_per_s, mfu)
