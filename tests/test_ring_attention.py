"""Context-parallel softmax attention (ring and all-gather of K/V) against full-sample attention on one process."""

import math

import pytest
import torch

from megamix.parallel import Group, ParallelState, record_communication
from megamix.parallel.context_parallel import SequenceLayout
from megamix.parallel.ring_attention import BlockMask, BlockPlan, context_attention
from megamix.testing import run_distributed

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 8
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def documents_of(*rows: list[int]) -> torch.Tensor:
    """Document index ``[batch, seq]`` from the document lengths of each row."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)) for lengths in rows])


# Samples of 64 positions: one chunk under cp = 1, chunks of 16 under cp = 2, of 8 under cp = 4.
DOCUMENTS = {
    "none": None,
    # Row 0: documents crossing chunk and rank boundaries. Row 1: documents starting exactly at chunk
    # starts (16 and 32 under cp = 2 and 4), short ones between them.
    "crossing": documents_of([5, 20, 13, 26], [16, 3, 2, 4, 7, 32]),
    "short": documents_of([1, 2, 3, 1, 4, 2, 5, 3, 1, 6, 2, 7, 3, 8, 4, 12], [3] * 20 + [4]),
    # Whole blocks inside one document in both rows: causal and unmasked blocks despite documents.
    "long": documents_of([40, 24], [40, 24]),
}


def inputs(seq_len: int, kv_heads: int, dtype: torch.dtype, seed: int = 0):
    """q [batch, seq, heads, d], k, v [batch, seq, kv_heads, d] and an output gradient, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, seq_len, heads, HEAD_DIM, generator=generator, dtype=dtype)
            for heads in (HEADS, kv_heads, kv_heads, HEADS)]


def reference(q, k, v, grad, documents):
    """Output and d(q, k, v) of masked softmax attention over the full samples, in plain PyTorch."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(groups, 2)) / math.sqrt(q.shape[-1])
    positions = torch.arange(q.shape[1])
    visible = (positions[:, None] >= positions[None, :]).expand(q.shape[0], -1, -1)
    if documents is not None:
        visible = visible & (documents[:, :, None] == documents[:, None, :])
    probs = scores.masked_fill(~visible[:, None], -math.inf).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.repeat_interleave(groups, 2))
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def sharded_attention(cp, seq_len, kv_heads, dtype, documents, gather_kv):
    """On each of ``cp`` ranks: this rank's output and d(q, k, v), and the sample positions of its tokens."""
    layout = SequenceLayout(seq_len, ParallelState.create(cp=cp).cp, documents)
    q, k, v, grad = (layout.shard(x).requires_grad_() for x in inputs(seq_len, kv_heads, dtype))
    out = context_attention(q, k, v, layout, gather_kv=gather_kv)
    out.backward(grad.detach())
    return layout.positions, [out.detach(), q.grad, k.grad, v.grad]


def check(cp, kv_heads, dtype, documents, gather_kv, seq_len=64):
    """Run on ``cp`` ranks, put every rank's tokens back in sample order, and compare with :func:`reference`."""
    if cp == 1:
        ranks = [sharded_attention(1, seq_len, kv_heads, dtype, documents, gather_kv)]
    else:
        ranks = run_distributed(sharded_attention, cp, cp, seq_len, kv_heads, dtype, documents, gather_kv)
    expected = reference(*inputs(seq_len, kv_heads, dtype), documents)
    for index, (name, want) in enumerate(zip(["out", "dq", "dk", "dv"], expected)):
        got = torch.empty_like(want)
        for positions, tensors in ranks:
            got[:, positions] = tensors[index]
        tolerance = TOLERANCE[dtype]
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("documents", ["crossing", "short", "long"])
def test_one_rank_is_document_masked_causal_attention(documents):
    check(1, KV_HEADS, torch.float64, DOCUMENTS[documents], gather_kv=False)


@pytest.mark.parametrize("gather_kv", [False, True], ids=["ring", "gather_kv"])
@pytest.mark.parametrize("documents", list(DOCUMENTS))
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_equals_full_attention(cp, documents, gather_kv):
    check(cp, KV_HEADS, torch.float64, DOCUMENTS[documents], gather_kv)


@pytest.mark.parametrize("kv_heads", [1, HEADS], ids=["mqa", "mha"])
def test_kv_head_groups(kv_heads):
    check(2, kv_heads, torch.float64, DOCUMENTS["crossing"], gather_kv=False)


@pytest.mark.parametrize("gather_kv", [False, True], ids=["ring", "gather_kv"])
def test_float32(gather_kv):
    check(4, KV_HEADS, torch.float32, DOCUMENTS["crossing"], gather_kv)


def test_blocks_are_skipped_causal_unmasked_or_masked():
    # cp=3: chunks of 4 positions; documents 0: chunk 0, 1: chunks 1-2, 2: chunk 3 and half of 4, 3: the rest
    layout = SequenceLayout(24, Group(None, 0, 3), documents_of([4, 8, 6, 6], [4, 8, 6, 6]))
    plan = BlockPlan(layout, torch.device("cpu"))
    assert plan.mask(0, 1) is None  # keys after the queries
    assert plan.mask(1, 0) is None  # no shared document
    assert plan.mask(1, 1) == BlockMask(causal=True)  # diagonal inside one document
    assert plan.mask(2, 1) == BlockMask()  # earlier keys of the same document
    assert plan.mask(4, 3).visible[0].tolist() == [[True] * 4] * 2 + [[False] * 4] * 2
    assert plan.mask(4, 4).visible[0].tolist() == [[True, False, False, False], [True, True, False, False],
                                                   [False, False, True, False], [False, False, True, True]]
    assert plan.mask(5, 3) is None
    plain = BlockPlan(SequenceLayout(24, Group(None, 0, 3)), torch.device("cpu"))
    assert plain.mask(2, 2) == BlockMask(causal=True) and plain.mask(2, 1) == BlockMask()


def communication(cp, seq_len, gather_kv):
    """Calls and bytes this rank sends in the forward and the backward of one attention."""
    layout = SequenceLayout(seq_len, ParallelState.create(cp=cp).cp, DOCUMENTS["none"])
    q, k, v, grad = (layout.shard(x).requires_grad_() for x in inputs(seq_len, KV_HEADS, torch.float32))
    with record_communication() as forward:
        out = context_attention(q, k, v, layout, gather_kv=gather_kv)
    with record_communication() as backward:
        out.backward(grad.detach())
    return dict(forward.kinds()), forward.bytes_sent, dict(backward.kinds()), backward.bytes_sent


def test_ring_sends_every_block_once_and_grows_with_the_sequence():
    cp = 4
    sent = {}
    for seq_len in (32, 64):
        kv_bytes = 2 * BATCH * (seq_len // cp) * KV_HEADS * HEAD_DIM * 4  # one rank's k and v, fp32
        forward, sent_forward, backward, sent_backward = run_distributed(communication, cp, cp, seq_len, False)[0]
        assert forward == {"send_recv": cp - 1} and sent_forward == (cp - 1) * kv_bytes
        # K/V around again, and their fp32 gradients one step further, to their owner
        assert backward == {"send_recv": 2 * cp - 1} and sent_backward == (2 * cp - 1) * kv_bytes
        sent[seq_len] = sent_forward + sent_backward
    assert sent[64] == 2 * sent[32]
    forward, _, backward, _ = run_distributed(communication, cp, cp, 64, True)[0]
    assert forward == {"all_gather": 1} and backward == {"all_gather": 1, "reduce_scatter": 1}
