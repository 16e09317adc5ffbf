"""Context parallelism and packed documents equal one process running whole samples (gloo, CPU workers)."""

import pytest
import torch

from megamix.parallel import ParallelState, record_communication
from megamix.parallel.context_parallel import SequenceLayout, check_sequence_split, document_index
from megamix.parallel.lasp import context_linear_attention
from megamix.errors import ConfigError
from megamix.testing import run_distributed
from megamix_kernels.linear_attention import linear_attention_full

BATCH, HEADS, KEY_HEADS, KEY_DIM, VALUE_DIM = 2, 4, 2, 8, 8
EOS = 3
# fp32 chunked kernel vs the fp32 full-matrix reference (sums of up to 64 decayed products)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def sample_tokens(seq: int, seed: int = 0) -> torch.Tensor:
    """Token rows with documents ending at random places (EOS ids), one of them right before a chunk start."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 50, (BATCH, seq), generator=generator)
    tokens[torch.rand(BATCH, seq, generator=generator) < 0.08] = EOS
    tokens[0, seq // 4 - 1] = EOS  # a document starts exactly at a chunk start under cp=2
    return tokens


def linear_inputs(seq: int, per_token_decay: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = {name: torch.randn(BATCH, seq, heads, dim, generator=generator, dtype=torch.float32)
              for name, heads, dim in [("q", KEY_HEADS, KEY_DIM), ("k", KEY_HEADS, KEY_DIM), ("v", HEADS, VALUE_DIM)]}
    decay_shape = (BATCH, seq, HEADS) if per_token_decay else (HEADS,)
    inputs["log_decay"] = -torch.rand(decay_shape, generator=generator, dtype=torch.float32)
    inputs["grad"] = torch.randn(BATCH, seq, HEADS, VALUE_DIM, generator=generator, dtype=torch.float32)
    return inputs


def reference_linear_attention(inputs: dict, documents: torch.Tensor | None):
    """Whole samples in one process: the full-matrix reference over each document (packed, batch of one)."""
    leaves = {name: inputs[name].clone().requires_grad_() for name in ("q", "k", "v", "log_decay")}
    batch, seq = inputs["v"].shape[:2]
    documents = torch.zeros(batch, seq, dtype=torch.long) if documents is None else documents
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    begins = starts.flatten().nonzero().squeeze(1)
    cu_seqlens = torch.cat([begins, begins.new_tensor([batch * seq])])
    decay = leaves["log_decay"]
    packed = [leaves[name].reshape(1, batch * seq, *leaves[name].shape[2:]) for name in ("q", "k", "v")]
    out, _ = linear_attention_full(*packed, decay if decay.dim() == 1 else decay.reshape(1, batch * seq, -1),
                                   scale=0.5, cu_seqlens=cu_seqlens)
    out = out.view_as(inputs["grad"])
    out.backward(inputs["grad"])
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def sharded_linear_attention(cp: int, inputs: dict, documents: torch.Tensor | None):
    """This rank's output and input gradients (positions of the full sample first) under cp ranks."""
    parallel = ParallelState.create(cp=cp)
    seq = inputs["v"].shape[1]
    layout = SequenceLayout(seq, parallel.cp, documents)
    local = {name: (layout.shard(t) if t.dim() > 1 else t).clone().requires_grad_()
             for name, t in inputs.items() if name != "grad"}
    with record_communication() as recorder:
        out = context_linear_attention(local["q"], local["k"], local["v"], local["log_decay"], layout, scale=0.5)
        out.backward(layout.shard(inputs["grad"]))
    return layout.positions, out.detach(), {name: t.grad for name, t in local.items()}, recorder.bytes_sent


def assemble(parts: list[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """Full-sample tensor from each rank's (positions, local tensor along dim 1)."""
    full = torch.zeros_like(like)
    for positions, local in parts:
        full[:, positions] = local
    return full


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("documents", [False, True], ids=["one-document", "documents"])
@pytest.mark.parametrize("per_token_decay", [False, True], ids=["lightning", "mamba2"])
def test_linear_attention_over_cp_ranks_equals_whole_samples(cp, documents, per_token_decay):
    seq = 64
    inputs = linear_inputs(seq, per_token_decay)
    docs = document_index(sample_tokens(seq), EOS) if documents else None
    expected, expected_grads = reference_linear_attention(inputs, docs)
    results = (run_distributed(sharded_linear_attention, cp, cp, inputs, docs) if cp > 1
               else [sharded_linear_attention(1, inputs, docs)])
    torch.testing.assert_close(assemble([(p, out) for p, out, _, _ in results], expected), expected, **TOLERANCE)
    for name, grad in expected_grads.items():
        if name == "log_decay" and not per_token_decay:  # one decay per head: each rank holds part of its gradient
            got = sum(grads[name] for _, _, grads, _ in results)
        else:
            got = assemble([(p, grads[name]) for p, _, grads, _ in results], grad)
        torch.testing.assert_close(got, grad, msg=name, **TOLERANCE)


def test_linear_attention_bytes_per_rank_do_not_grow_with_the_sequence():
    sent = []
    for seq in (64, 128):
        inputs = linear_inputs(seq, per_token_decay=True)
        docs = document_index(sample_tokens(seq), EOS)
        sent.append(run_distributed(sharded_linear_attention, 2, 2, inputs, docs)[0][3])
    assert sent[0] > 0 and sent[1] == sent[0]


def test_layout_chunks_and_positions():
    tokens = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, 4]])
    documents = document_index(tokens, EOS)
    assert documents.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    layout = SequenceLayout(8, documents=documents)
    assert layout.document_positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert layout.segment_starts().tolist() == [[True, False, False, True, False, False, False, True]]
    with pytest.raises(ConfigError, match="data.seq_len=6 must be a multiple of 2 × parallel.cp = 4"):
        check_sequence_split(6, 2)
