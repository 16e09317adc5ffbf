"""Context parallelism: where the tokens of a micro-batch sit, across the ``cp`` ranks and across documents.

Each sample of ``seq_len`` tokens is cut into ``2·cp`` chunks and cp rank r holds chunks r and
2cp − 1 − r, in that order (with cp = 1, the whole sample as one chunk). Under causal softmax
attention a late chunk costs more than an early one; an early and a late chunk per rank balance the
load. Every layer works on this rank's tokens ``[batch, local_seq, ...]``; the mixers that look
across tokens (attention, Lightning, Mamba-2) learn from the :class:`SequenceLayout` where each
local token sits and which document it belongs to.

Packed documents: a sample is a window of documents laid end to end, each ending in EOS. With
``documents`` set, position t belongs to document ``documents[b, t]`` (the token after an EOS starts
the next one): mixers never look across a document start, and positions restart at each.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from megamix.errors import ConfigError
from megamix.parallel.comm import all_reduce, gather_parts, total_of_shares
from megamix.parallel.state import NO_TENSOR_PARALLEL, SINGLE, Group, TensorParallel


def document_index(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """tokens ``[batch, seq]`` → the document of each position ``[batch, seq]`` (0, 1, … per row):
    an EOS ends its document, the next token starts a new one."""
    ends = tokens == eos_id
    return ends.cumsum(dim=1) - ends.long()


def check_sequence_split(seq_len: int, cp: int) -> None:
    """Refuse a sample length that the ``2·cp`` chunks of context parallelism do not divide."""
    if cp > 1 and seq_len % (2 * cp):
        raise ConfigError(f"data.seq_len={seq_len} must be a multiple of 2 × parallel.cp = {2 * cp} (each cp rank "
                          f"holds two chunks of every sample); e.g. data.seq_len={seq_len // (2 * cp) * 2 * cp or 2 * cp}")


@dataclass(frozen=True, eq=False)
class SequenceLayout:
    """This rank's share of samples of ``seq_len`` tokens, and their documents.

    group: the context-parallel group. documents: ``[batch, seq_len]`` document index of every position
    of the full samples (non-decreasing in each row, from :func:`document_index`), the same on every
    rank; None when each sample is one document. attention_comm: how softmax attention reaches the other
    ranks' keys and values, ``"ring"`` or ``"all_gather"`` (see :mod:`megamix.parallel.ring_attention`). Local tensors are ``[batch, local_seq, ...]`` with
    ``local_seq = seq_len / cp``: the chunks :attr:`chunks` one after the other.
    """

    seq_len: int
    group: Group = SINGLE
    documents: torch.Tensor | None = None
    attention_comm: str = "ring"

    def __post_init__(self):
        check_sequence_split(self.seq_len, self.group.size)

    @property
    def num_chunks(self) -> int:
        return 1 if self.group.size == 1 else 2 * self.group.size

    @property
    def chunk_len(self) -> int:
        return self.seq_len // self.num_chunks

    @property
    def local_len(self) -> int:
        return self.seq_len // self.group.size

    @property
    def chunks(self) -> tuple[int, ...]:
        """Global indices of the chunks this rank holds, in local order."""
        return self.chunks_of(self.group.rank)

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        """The chunks cp rank ``rank`` holds, in its local order (the inverse of :meth:`owner`)."""
        cp = self.group.size
        return (0,) if cp == 1 else (rank, 2 * cp - 1 - rank)

    def owner(self, chunk: int) -> tuple[int, int]:
        """(cp rank, local slot) of global chunk ``chunk``."""
        cp = self.group.size
        return (chunk, 0) if chunk < cp else (2 * cp - 1 - chunk, 1)

    @property
    def is_trivial(self) -> bool:
        """One rank and one document per sample: every mixer runs as on a plain batch."""
        return self.group.size == 1 and self.documents is None

    def chunk_span(self, chunk: int) -> slice:
        """The positions of global chunk ``chunk`` in the full sample."""
        return slice(chunk * self.chunk_len, (chunk + 1) * self.chunk_len)

    @cached_property
    def positions(self) -> torch.Tensor:
        """Position in the full sample of each local token, ``[local_seq]`` (int64, on the documents' device)."""
        device = self.documents.device if self.documents is not None else "cpu"
        return torch.cat([torch.arange(self.chunk_span(c).start, self.chunk_span(c).stop, device=device)
                          for c in self.chunks])

    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full-sample tensor (``seq_len`` along ``dim``)."""
        if self.group.size == 1:
            return full
        return full.index_select(dim, self.positions.to(full.device))

    @cached_property
    def local_documents(self) -> torch.Tensor | None:
        """Document of each local token ``[batch, local_seq]``, or None."""
        return None if self.documents is None else self.shard(self.documents)

    @cached_property
    def document_positions(self) -> torch.Tensor:
        """Position of each local token inside its document: ``[local_seq]`` without documents (the sample
        position), ``[batch, local_seq]`` with them. What rotary embeddings rotate by."""
        if self.documents is None:
            return self.positions
        seq = torch.arange(self.seq_len, device=self.documents.device).expand_as(self.documents)
        starts = torch.ones_like(self.documents, dtype=torch.bool)
        starts[:, 1:] = self.documents[:, 1:] != self.documents[:, :-1]
        first = torch.where(starts, seq, torch.zeros_like(seq)).cummax(dim=1).values
        return self.shard(seq - first)

    def segment_starts(self) -> torch.Tensor:
        """Whether a document starts at each local token ``[batch, local_seq]`` (bool): the places where a
        linear-time mixer's state and convolution window restart. Chunk starts continue the previous chunk
        unless a document starts there; the first position of a sample always starts one."""
        if self.documents is None:
            starts = torch.zeros(1, self.seq_len, dtype=torch.bool)
        else:
            starts = torch.ones_like(self.documents, dtype=torch.bool)
            starts[:, 1:] = self.documents[:, 1:] != self.documents[:, :-1]
        starts[:, 0] = True
        return self.shard(starts)

    def sum_over_ranks(self, stat: torch.Tensor) -> torch.Tensor:
        """A statistic of this rank's tokens ``[...]`` summed over the cp ranks: the same statistic
        ``[...]`` of the whole samples (a new tensor; ``stat`` is left as it is)."""
        return all_reduce(stat.clone(), self.group)

    def total_of_shares(self, share: torch.Tensor, tp: TensorParallel = NO_TENSOR_PARALLEL) -> torch.Tensor:
        """A loss summed over the tokens of the samples, from this rank's ``share`` of them (a scalar): its
        value sums the shares of the cp ranks and, under sequence parallel, of the ``tp`` ranks (which hold
        further sequence shards); its gradient stays this rank's share
        (:func:`~megamix.parallel.comm.total_of_shares`)."""
        return total_of_shares(share, *((tp.group, self.group) if tp.sequence_parallel else (self.group,)))

    def same_document(self, shift: int) -> torch.Tensor | None:
        """Whether sample position p − ``shift`` lies in the document of p, for each local token
        ``[batch, local_seq]`` (False before the sample start); None without documents."""
        if self.documents is None:
            return None
        positions = self.positions.to(self.documents.device)
        earlier = self.documents[:, (positions - shift).clamp(min=0)]
        return (earlier == self.local_documents) & (positions >= shift)


def preceding_tokens(x: torch.Tensor, layout: SequenceLayout, count: int) -> torch.Tensor:
    """The ``count`` tokens before each local chunk in the sample: ``x [batch, local_seq, channels]`` →
    ``[batch, chunks, count, channels]``, zeros before the sample start. What a causal convolution of
    width count + 1 needs across a chunk boundary: under context parallelism the chunks' tails are
    all-gathered (a payload independent of the sequence length), and gradients flow back to them."""
    batch, _, channels = x.shape
    chunks, chunk_len = len(layout.chunks), layout.chunk_len
    if count > chunk_len:
        raise ConfigError(f"a convolution window of {count + 1} tokens does not fit chunks of {chunk_len} tokens "
                          f"(data.seq_len / (2 × parallel.cp)); use a longer data.seq_len or a smaller parallel.cp")
    tails = x.view(batch, chunks, chunk_len, channels)[:, :, chunk_len - count:]
    gathered = gather_parts(tails.unsqueeze(0), layout.group)  # [cp, batch, chunks, count, channels]
    before = []
    for chunk in layout.chunks:
        if chunk == 0:
            before.append(x.new_zeros(batch, count, channels))
        else:
            rank, slot = layout.owner(chunk - 1)
            before.append(gathered[rank, :, slot])
    return torch.stack(before, dim=1)
