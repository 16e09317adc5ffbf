"""HF ``LlamaForCausalLM`` → megamix in memory, for oracles that hold a transformers model (see
:mod:`megamix.convert.architectures` for the mapping)."""

from collections.abc import Callable

import torch

from megamix.config import ModelConfig
from megamix.convert.architectures import ARCHITECTURES, state_from_hf


def megamix_from_hf(m: ModelConfig, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """megamix parameters of a Llama-shaped ``m`` (pattern ``*-`` repeats) from HF tensors fetched by ``get(name)``."""
    return state_from_hf(ARCHITECTURES["LlamaForCausalLM"], m, get)
