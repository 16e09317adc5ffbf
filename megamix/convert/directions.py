"""The two conversions: an HF Llama directory → a megamix checkpoint, and back."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megamix import __version__
from megamix.checkpoint.store import (
    load_checkpoint,
    read_config,
    read_metadata,
    resolve_checkpoint,
    save_checkpoint,
)
from megamix.config import Config, ModelConfig, ParallelConfig, config_from_dict
from megamix.convert import llama
from megamix.convert.hf import SafetensorsReader, read_hf_config, write_hf
from megamix.errors import CheckpointError


def _fresh_training_state(params: dict[str, torch.Tensor]) -> dict:
    """What ``Trainer`` loads besides the weights, as a run that has not taken a step yet would save it.

    Resuming loads the Adam moments, step counters, RNG and data position too, so a
    weights-only checkpoint could not be passed to ``train.resume``.
    """
    state = {f"optim.{name}.{key}": torch.zeros(p.shape, dtype=torch.float32)
             for name, p in params.items() for key in ("exp_avg", "exp_avg_sq")}
    state |= {"optim.step": torch.tensor(0.0), "rng.cpu": torch.get_rng_state(), "train.step": 0,
              "data.consumed": 0}
    return state


def hf_to_megamix(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/step_0`` (and ``latest``) from an HF ``LlamaForCausalLM`` directory; returns step_0."""
    hf_dir = Path(hf_dir)
    model = llama.model_config_from_hf(read_hf_config(hf_dir), str(hf_dir / "config.json"))
    with SafetensorsReader(hf_dir) as reader:
        params = llama.megamix_from_hf(model, reader.get)
        if model.tie_embeddings and "lm_head.weight" in reader:
            reader.read.add("lm_head.weight")  # a copy of the embedding that some exporters keep
        leftover = sorted(n for n in reader.names - reader.read if not n.endswith(llama.DERIVED_SUFFIXES))
        if leftover:
            raise CheckpointError(f"{hf_dir}: {len(leftover)} tensors do not belong to a {llama.ARCHITECTURE} "
                                  f"with this config.json: {', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}")
    state = {f"model.{name}": t for name, t in params.items()} | _fresh_training_state(params)
    meta = {"world_size": 1, "layout": vars(ParallelConfig()), "tokens": 0, "megamix_version": __version__,
            "converted_from": str(hf_dir.resolve())}
    return save_checkpoint(out_dir, 0, state, Config(model=model).to_dict(), meta)


def load_model_state(checkpoint: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], int]:
    """A checkpoint's model config, full model tensors (whatever layout saved it) and ``data.seq_len``."""
    path = resolve_checkpoint(checkpoint)
    config = config_from_dict(read_config(path))
    entries = read_metadata(path).state_dict_metadata
    # DCP reassembles each global tensor from the pieces every rank wrote
    tensors = {key.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in entries.items() if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no model.* tensors")
    load_checkpoint(path, {"model": tensors})
    return config.model, tensors, config.data.seq_len


def megamix_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` for ``LlamaForCausalLM``; ``dtype`` None keeps the stored one."""
    # refuse a non-Llama pattern before reading any tensor
    llama.check_llama_pattern(config_from_dict(read_config(resolve_checkpoint(checkpoint))).model)
    model, tensors, seq_len = load_model_state(checkpoint)
    expected = set(llama.name_map(model))
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise CheckpointError(f"checkpoint {checkpoint}: {len(unknown)} tensors have no place in {llama.ARCHITECTURE}: "
                              f"{', '.join('model.' + n for n in unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    hf_config = llama.hf_config_from_model(model, dtype or tensors["embed.weight"].dtype, seq_len)
    hf_tensors = llama.hf_from_megamix(model, tensors)
    if dtype is not None:
        hf_tensors = {name: t.to(dtype) for name, t in hf_tensors.items()}
    out_dir = Path(out_dir)
    write_hf(out_dir, hf_tensors, hf_config)
    return out_dir
