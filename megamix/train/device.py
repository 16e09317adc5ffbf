"""Device choice, peak throughput for MFU, and peak memory."""

from __future__ import annotations

import os
import resource

import torch

from megamix.errors import ConfigError

# Dense peak TFLOP/s (no sparsity) by GPU name fragment, per precision.
# fp32 runs as TF32 on tensor cores under torch's default matmul precision "high".
_PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 494.7},
    "H100": {"bf16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def pick_device(choice: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else CPU; on CUDA this process's GPU is LOCAL_RANK."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s for ``precision``, or None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in _PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[precision] * 1e12
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
