"""What the mixers of one forward pass share."""

from dataclasses import dataclass, field

import torch

from megamix.nn.aux_loss import AuxLosses
from megamix.parallel.context_parallel import SequenceLayout


@dataclass
class ForwardContext:
    """Built once per forward by the model and passed to every ``mixer(x, ctx)``.

    rope_cos, rope_sin: rotary tables ``[seq, head_dim]``, or ``[batch, seq, head_dim]`` when positions restart
    at document starts (see :func:`megamix.nn.rotary.rotary_tables`).
    sequence: where this rank's tokens sit in the samples and their documents (context parallelism, packing).
    aux: where routed layers attach their auxiliary losses (see :mod:`megamix.nn.aux_loss`).
    """

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    sequence: SequenceLayout
    aux: AuxLosses = field(default_factory=AuxLosses)
