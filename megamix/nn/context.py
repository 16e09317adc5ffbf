"""What the mixers of one forward pass share."""

from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    """Built once per forward by the model and passed to every ``mixer(x, ctx)``.

    rope_cos, rope_sin: rotary tables ``[seq, head_dim]`` (see :func:`megamix.nn.rotary.rotary_tables`).
    """

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
