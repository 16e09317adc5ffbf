"""Parameter initialisation that depends only on (seed, parameter name, full shape).

Each parameter draws from its own CPU generator seeded by a stable hash of
``f"{seed}/{name}"``, so its values do not change with construction order, the
device, the other layers of the model or how tensor parallelism shards it.
"""

import hashlib
import math

import torch
from torch import nn

from megamix.nn.norms import GatedRMSNorm, RMSNorm
from megamix.parallel import sharding_of

# Projections whose output is added to the residual stream: their std shrinks
# with depth so the stream's variance stays O(1) (GPT-2, Megatron).
RESIDUAL_OUTPUT_PROJECTIONS = ("out_proj", "down_proj")
# Norms whose weight scales the normalised values: it starts at 1.
SCALED_NORMS = (RMSNorm, GatedRMSNorm)


def parameter_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by the first 8 bytes of sha256(f"{seed}/{name}")."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float, num_layers: int) -> None:
    """Norm weights ← 1; a parameter whose module has ``initial_value(name, full_shape, generator)``
    ← what it returns (unless None); residual output projections ← N(0, std/√(2·num_layers));
    others ← N(0, std). Modules with ``reset_buffers()`` (e.g. MoE's balancing bias) reset their
    buffers, which come uninitialised off the meta device.

    num_layers counts residual layers (pattern characters, so a Llama block ``*-`` is two).
    """
    residual_std = std / math.sqrt(2 * num_layers)
    for name, param in model.named_parameters():
        module_name, _, param_name = name.rpartition(".")
        owner = model.get_submodule(module_name)
        if isinstance(owner, SCALED_NORMS):
            param.fill_(1.0)
            continue
        sharding = sharding_of(param)
        generator = parameter_generator(seed, name)
        own_init = getattr(owner, "initial_value", None)  # a layer's own rule, e.g. Mamba-2's A_log
        full = own_init(param_name, sharding.global_shape, generator) if own_init else None
        if full is None:
            is_residual_output = module_name.rpartition(".")[2] in RESIDUAL_OUTPUT_PROJECTIONS
            full = torch.empty(sharding.global_shape).normal_(
                0.0, residual_std if is_residual_output else std, generator=generator
            )
        param.copy_(sharding.take(full))  # the full tensor is drawn on every rank: layout-independent
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
