"""``megamix inspect``: what a checkpoint holds, read from its metadata without loading it."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from megamix.checkpoint.store import read_config, read_meta, resolve_checkpoint
from megamix.config import ModelConfig, config_from_dict
from megamix.errors import ConfigError


def _architecture(m: ModelConfig, meta: dict) -> str:
    """The HF architecture the checkpoint came from, or the one it would export as."""
    from megamix.convert.architectures import architecture_for

    if "architecture" in meta:
        return f"{meta['architecture']} (converted from {meta.get('converted_from', '?')})"
    try:
        return f"megamix; exports as {architecture_for(m).name}"
    except ConfigError:
        return "megamix; no Hugging Face equivalent"


def parameter_counts(m: ModelConfig, sizes: dict[str, int]) -> tuple[int, int]:
    """Total and active-per-token parameter counts of the parameters among ``sizes`` (name → numel).

    Active: each MoE layer runs top_k of its num_experts routed experts per token, so
    (num_experts − top_k) / num_experts of its routed experts' parameters are idle.
    """
    total = sum(sizes.values())
    routed = sum(n for name, n in sizes.items() if ".mixer.experts." in name)
    return total, total - routed * (m.moe.num_experts - m.moe.top_k) // m.moe.num_experts


def describe_checkpoint(path: str | Path, tensors: bool = False) -> str:
    """A readable summary: step, architecture, pattern, parameter counts, layout, dtypes (and per-tensor lines)."""
    from megamix.convert.directions import model_shapes, read_tensor, tensor_entries
    from megamix.models.hybrid import LAYER_KINDS

    path = resolve_checkpoint(path)
    meta, config = read_meta(path), config_from_dict(read_config(path))
    m = config.model
    entries = tensor_entries(path)
    model_tensors = {k.removeprefix("model."): v for k, v in entries.items() if k.startswith("model.")}
    params, _ = model_shapes(m)
    total, active = parameter_counts(m, {n: math.prod(t.size) for n, t in model_tensors.items() if n in params})
    dtypes = sorted({str(t.properties.dtype).removeprefix("torch.") for t in model_tensors.values()})
    pattern = m.pattern.replace("|", "")
    kinds = ", ".join(f"{n} {LAYER_KINDS[c].name}" for c, n in Counter(pattern).items())
    layout = " ".join(f"{k}={v}" for k, v in meta.get("layout", {}).items())
    optimizer = sum(1 for k in entries if k.startswith("optim."))
    lines = [
        f"checkpoint  {path}",
        f"step        {meta['step']} ({meta.get('tokens', 0):,} tokens)",
        f"model       {_architecture(m, meta)}",
        (f"pattern     '{m.pattern}' ({len(pattern)} layers: {kinds}), hidden {m.hidden_size}, "
         f"heads {m.num_heads}/{m.num_kv_heads} kv, vocab {m.vocab_size}"),
        (f"parameters  {total:,} in {len(model_tensors)} tensors ({', '.join(dtypes)}); {active:,} active per token"
         f"{f' (top {m.moe.top_k} of {m.moe.num_experts} experts)' if 'E' in pattern else ''}"),
        f"optimizer   {f'{optimizer} tensors' if optimizer else 'none'}",
        f"layout      world size {meta.get('world_size', 1)}: {layout}",
    ]
    if tensors:
        width = max(len(name) for name in model_tensors)
        lines.append("")
        for name, entry in model_tensors.items():  # one tensor in memory at a time
            value = read_tensor(path, f"model.{name}", entry)
            lines.append(f"{name:<{width}}  {list(value.shape)!s:<16} {str(value.dtype).removeprefix('torch.'):<9}"
                         f" norm {value.float().norm():.4f}")
    return "\n".join(lines)
