"""Devices the planner knows: peak throughput, memory and link bandwidths.

Peak TFLOP/s are :mod:`megamix.train.device`'s (the MFU the trainer logs uses the same numbers).
Bandwidths are per GPU and per direction, as a ring collective sees them: NVLink inside a node,
the node's InfiniBand NICs shared by its GPUs across nodes (one 400 Gb/s NIC per H100/H200, one
200 Gb/s NIC per A100 in NVIDIA's DGX/HGX reference designs).
"""

from __future__ import annotations

from dataclasses import dataclass

from megamix.errors import ConfigError
from megamix.train.device import _PEAK_TFLOPS

GiB = 2**30


@dataclass(frozen=True)
class Device:
    """One accelerator (or CPU socket) of a cluster.

    ``matmul_efficiency``: the fraction of peak the model's FLOPs run at (the step-time model divides
    them by ``peak · matmul_efficiency``; the norms, activations and attention kernels between the
    GEMMs are not modelled apart, so this folds them in). 0.5 on GPUs: with it the best layout of a
    Llama-3-8B shape on 8 H100s comes out at ~46% MFU, at Megatron-Core's published best (47%) and
    above torchtitan's eager FSDP (33–39%), see docs/estimate.md.
    """

    name: str
    peak_tflops: dict[str, float]  # per precision, dense
    memory_gib: float
    memory_gbps: float  # device memory bandwidth, GB/s (optimizer step)
    intra_node_gbps: float  # per GPU per direction, GB/s
    inter_node_gbps: float
    matmul_efficiency: float = 0.5
    latency_us: float = 10.0  # per collective call
    shared_memory: bool = False  # a CPU: the ranks of a node share its memory
    per_node: int = 8  # devices in one node (HGX/DGX)

    def memory_per_rank(self, procs_per_node: int) -> float:
        """Bytes one rank may use."""
        return self.memory_gib * GiB / (procs_per_node if self.shared_memory else 1)

    def peak_flops(self, precision: str) -> float:
        return self.peak_tflops[precision] * 1e12


DEVICES: dict[str, Device] = {
    "h100": Device("H100 SXM 80GB", _PEAK_TFLOPS["H100"], 80, 3350, 450, 50),
    "h200": Device("H200 SXM 141GB", _PEAK_TFLOPS["H200"], 141, 4800, 450, 50),
    "a100": Device("A100 SXM 80GB", _PEAK_TFLOPS["A100"], 80, 2039, 300, 25),
    # This project's 2-core dev VM: fp32 GEMM measured at 0.3-0.37 TFLOP/s (bench/README.md), bf16
    # autocast about twice that; gloo over loopback; 24 GiB shared by the ranks of one "node".
    "cpu": Device("CPU (2-core dev VM)", {"fp32": 0.35, "bf16": 0.7}, 24, 20, 2, 2, matmul_efficiency=0.8,
                  latency_us=100.0, shared_memory=True),
}


def get_device(name: str) -> Device:
    """The device called ``name`` (case-insensitive); an unknown name is an error listing the known ones."""
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ConfigError(f"--gpu {name}: unknown device; known: {', '.join(DEVICES)}") from None


def local_device() -> str | None:
    """The planner's name of the GPU this process sees (None: an unknown GPU), or ``"cpu"`` without one."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().upper()
    return next((key for key in DEVICES if key != "cpu" and key.upper() in name), None)
