"""Micro-batches as a rank computes them: its share of the tokens, their layout, targets and loss weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamix.parallel.context_parallel import SequenceLayout, document_index
from megamix.parallel.state import Group


@dataclass(frozen=True)
class MicroBatch:
    """inputs, targets ``[batch, local_seq]`` (int64) and loss weights ``[batch, local_seq]`` (fp32) of this
    rank's tokens in ``sequence``. The weights are 1 / (the tokens counted in the micro-batch's loss, over
    all context-parallel ranks), 0 for a token not counted: Σ weight · cross-entropy over the cp ranks is
    the micro-batch's mean loss."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    sequence: SequenceLayout


def split_micro_batch(tokens: torch.Tensor, cp: Group, eos_id: int | None, attention_comm: str = "ring") -> MicroBatch:
    """tokens ``[batch, seq + 1]`` of whole samples → this cp rank's :class:`MicroBatch`.

    With ``eos_id`` (``data.reset_at_eos``) the samples are packed documents: each position belongs to the
    document its EOS ends (:func:`~megamix.parallel.context_parallel.document_index`), and the prediction
    from an EOS — the first token of the next, unrelated document — is not counted in the loss (as
    Megatron's ``eod_mask_loss``). ``attention_comm``: ``parallel.cp_comm``.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    documents = None if eos_id is None else document_index(inputs, eos_id)
    counted = torch.ones_like(inputs, dtype=torch.float32) if eos_id is None else (inputs != eos_id).float()
    sequence = SequenceLayout(inputs.shape[1], cp, documents, attention_comm)
    weights = counted / counted.sum().clamp(min=1)
    return MicroBatch(sequence.shard(inputs), sequence.shard(targets), sequence.shard(weights), sequence)
