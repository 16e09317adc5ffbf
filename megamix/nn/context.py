"""What the mixers of one forward pass share."""

from dataclasses import dataclass, field

import torch

from megamix.nn.aux_loss import AuxLosses


@dataclass
class ForwardContext:
    """Built once per forward by the model and passed to every ``mixer(x, ctx)``.

    rope_cos, rope_sin: rotary tables ``[seq, head_dim]`` (see :func:`megamix.nn.rotary.rotary_tables`).
    aux: where routed layers attach their auxiliary losses (see :mod:`megamix.nn.aux_loss`).
    """

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    aux: AuxLosses = field(default_factory=AuxLosses)
