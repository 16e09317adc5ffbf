"""``megamix inspect``: what a checkpoint holds, read from its metadata without loading it."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megamix.checkpoint.store import load_checkpoint, read_config, read_meta, read_metadata, resolve_checkpoint


def _model_tensors(path: Path) -> dict[str, TensorStorageMetadata]:
    entries = read_metadata(path).state_dict_metadata
    return {k.removeprefix("model."): v for k, v in entries.items()
            if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}


def describe_checkpoint(path: str | Path, tensors: bool = False) -> str:
    """A readable summary: step, architecture, parameter count, layout, dtypes (and per-tensor lines)."""
    path = resolve_checkpoint(path)
    meta, config = read_meta(path), read_config(path)
    model_tensors = _model_tensors(path)
    total = sum(math.prod(t.size) for t in model_tensors.values())
    dtypes = sorted({str(t.properties.dtype).removeprefix("torch.") for t in model_tensors.values()})
    m = config["model"]
    layout = " ".join(f"{k}={v}" for k, v in meta.get("layout", {}).items())
    lines = [
        f"checkpoint  {path}",
        f"step        {meta['step']} ({meta.get('tokens', 0):,} tokens)",
        f"pattern     '{m['pattern']}' ({len(m['pattern'].replace('|', ''))} layers), hidden {m['hidden_size']}, "
        f"heads {m['num_heads']}/{m['num_kv_heads']} kv, vocab {m['vocab_size']}",
        f"parameters  {total:,} in {len(model_tensors)} tensors ({', '.join(dtypes)})",
        f"layout      world size {meta.get('world_size', 1)}: {layout}",
    ]
    if tensors:
        values = {name: torch.empty(t.size, dtype=t.properties.dtype) for name, t in model_tensors.items()}
        load_checkpoint(path, {"model": values})
        width = max(len(name) for name in values)
        lines.append("")
        lines += [f"{name:<{width}}  {str(list(v.shape)):<16} norm {v.float().norm():.4f}" for name, v in values.items()]
    return "\n".join(lines)
