"""The chunked PyTorch linear attention (the CPU path) against the references in naive.py.

Outputs, final states and the gradients of q, k, v, log_decay (both forms) and the initial state, with a
final-state gradient, on lengths that are not multiples of the chunk, head dims that are not powers of
two, key groups, several blocks of chunks and packed sequences; bf16 inputs; strong decay; the one-token
``step`` that generation runs; and a float64 gradcheck of the hand-written backward.
"""

import pytest
import torch
from linear_attention_cases import assert_results_close, make_inputs, relative_rmse, run

from megamix_kernels.linear_attention import chunk as chunk_module
from megamix_kernels.linear_attention.chunk import chunk_linear_attention
from megamix_kernels.linear_attention.naive import linear_attention_full, linear_attention_recurrent, step

# (batch, seq, key_heads, heads, key_dim, value_dim, per_token_decay, chunk_size)
CASES = [
    (2, 37, 2, 4, 24, 48, True, 16),  # key groups of 2 heads, odd length, dims not powers of two
    (2, 37, 2, 4, 24, 48, False, 16),
    (1, 130, 4, 4, 48, 24, False, 64),  # the last of 3 chunks partial
    (1, 130, 1, 4, 16, 32, True, 16),  # Mamba-2 style: one B/C group for all heads
    (2, 1, 1, 3, 24, 16, True, 16),  # a single token
    (3, 64, 2, 2, 32, 32, False, 64),  # exactly one chunk
]


@pytest.fixture(autouse=True)
def one_thread():
    """The shapes here are tiny: with one thread no op waits on the thread pool (which stalls when other
    processes keep the CPU busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def use_blocks_of(chunks_per_block, heads, chunk_size, monkeypatch):
    """Makes the chunked path run its chunks in blocks of this many (None: the default, here one block)."""
    if chunks_per_block is not None:
        monkeypatch.setattr(chunk_module, "BLOCK_ROWS", chunks_per_block * heads * chunk_size)


@pytest.mark.parametrize("chunks_per_block", [None, 1, 3])
@pytest.mark.parametrize("case", CASES)
def test_fp32_equals_the_full_reference(case, chunks_per_block, monkeypatch):
    *shape, chunk_size = case
    use_blocks_of(chunks_per_block, shape[3], chunk_size, monkeypatch)
    inputs = make_inputs(*shape)
    expected = run(linear_attention_full, inputs, torch.float64)
    actual = run(chunk_linear_attention, inputs, chunk_size=chunk_size)
    assert actual["o"].dtype == torch.float32 and actual["final_state"].dtype == torch.float32
    assert_results_close(actual, expected, 2e-5)


@pytest.mark.parametrize("per_token_decay", [True, False])
def test_fp32_equals_the_recurrent_reference(per_token_decay):
    inputs = make_inputs(2, 37, 1, 3, 24, 16, per_token_decay)
    expected = run(linear_attention_recurrent, inputs, torch.float64)
    actual = run(chunk_linear_attention, inputs, chunk_size=16)
    assert_results_close(actual, expected, 2e-5)


def test_without_initial_or_final_state():
    inputs = make_inputs(2, 37, 2, 4, 24, 48, True)
    expected = run(linear_attention_full, inputs, torch.float64, initial_state=False, final_state=False)
    actual = run(chunk_linear_attention, inputs, initial_state=False, final_state=False, chunk_size=16)
    assert_results_close(actual, expected, 2e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_bf16_inputs_compute_in_fp32(case):
    *shape, chunk_size = case
    inputs = make_inputs(*shape)
    inputs.update({name: inputs[name].bfloat16().double() for name in ("q", "k", "v")})
    expected = run(linear_attention_full, inputs, torch.float64)
    actual = run(chunk_linear_attention, inputs, torch.bfloat16, chunk_size=chunk_size)
    assert actual["o"].dtype == actual["dq"].dtype == torch.bfloat16
    assert actual["final_state"].dtype == actual["dlog_decay"].dtype == torch.float32
    assert_results_close(actual, expected, 5e-3, relative_rmse)


def test_strong_decay_stays_accurate():
    """Per-token log decay down to −8 (Mamba-2 with large dt · A): the weights underflow inside a chunk."""
    inputs = make_inputs(1, 130, 1, 4, 16, 32, True, decay_rate=8.0)
    expected = run(linear_attention_full, inputs, torch.float64)
    actual = run(chunk_linear_attention, inputs, chunk_size=64)
    assert_results_close(actual, expected, 2e-5)


@pytest.mark.parametrize("chunks_per_block", [None, 1, 3])
@pytest.mark.parametrize("per_token_decay", [True, False])
def test_packed_sequences_equal_a_loop_over_documents(per_token_decay, chunks_per_block, monkeypatch):
    """Lengths 37, 1, 64 and 28 packed in one row, chunk 16: equal to one fixed-length call per document
    (gradients of a shared [heads] log decay summed over the documents) and to the full reference."""
    use_blocks_of(chunks_per_block, 4, 16, monkeypatch)
    cu_seqlens = torch.tensor([0, 37, 38, 102, 130])
    inputs = make_inputs(1, 130, 2, 4, 24, 48, per_token_decay, sequences=4)
    packed = run(chunk_linear_attention, inputs, cu_seqlens=cu_seqlens, chunk_size=16)

    def per_document(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
        outputs, finals = [], []
        for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            document_decay = log_decay[:, start:end] if log_decay.dim() == 3 else log_decay
            o, final = chunk_linear_attention(q[:, start:end], k[:, start:end], v[:, start:end], document_decay,
                                              scale, initial_state[n : n + 1], True, chunk_size=chunk_size)
            outputs.append(o)
            finals.append(final)
        return torch.cat(outputs, dim=1), torch.cat(finals)

    assert_results_close(packed, run(per_document, inputs, cu_seqlens=cu_seqlens, chunk_size=16), 1e-6)
    assert_results_close(packed, run(linear_attention_full, inputs, torch.float64, cu_seqlens=cu_seqlens), 2e-5)


def test_empty_packed_sequence_passes_its_state_through():
    cu_seqlens = torch.tensor([0, 5, 5, 12])
    inputs = make_inputs(1, 12, 1, 2, 8, 8, True, sequences=3)
    expected = run(linear_attention_full, inputs, torch.float64, cu_seqlens=cu_seqlens)
    actual = run(chunk_linear_attention, inputs, cu_seqlens=cu_seqlens, chunk_size=4)
    assert_results_close(actual, expected, 2e-5)
    torch.testing.assert_close(actual["final_state"][1], inputs["initial_state"][1].float())


@pytest.mark.parametrize("per_token_decay", [True, False])
def test_token_by_token_step_equals_the_chunked_output(per_token_decay):
    """``step``, what generation runs, continues from the same initial state to the same outputs and state."""
    inputs = make_inputs(2, 37, 2, 4, 24, 48, per_token_decay)
    q, k, v, log_decay, initial_state = (inputs[n].float() for n in ("q", "k", "v", "log_decay", "initial_state"))
    expected, expected_final = chunk_linear_attention(q, k, v, log_decay, 0.7, initial_state, True, chunk_size=16)
    state, outputs = initial_state, []
    for t in range(q.shape[1]):
        out, state = step(q[:, t], k[:, t], v[:, t], log_decay[:, t] if per_token_decay else log_decay, state, 0.7)
        outputs.append(out)
    torch.testing.assert_close(torch.stack(outputs, dim=1), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_token_decay", [True, False])
@pytest.mark.parametrize("cu_seqlens", [None, [0, 2, 7]], ids=["batch", "packed"])
def test_backward_passes_float64_gradcheck(per_token_decay, cu_seqlens):
    batch = 2 if cu_seqlens is None else 1
    inputs = make_inputs(batch, 7, 1, 2, 3, 2, per_token_decay, sequences=2)
    leaves = [inputs[n].clone().requires_grad_() for n in ("q", "k", "v", "log_decay", "initial_state")]
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens)

    def chunked(q, k, v, log_decay, initial_state):
        return chunk_linear_attention(q, k, v, log_decay, 0.7, initial_state, True, offsets, chunk_size=2)

    assert torch.autograd.gradcheck(chunked, leaves)


def test_bad_shapes_are_refused():
    q = torch.randn(1, 8, 2, 4)
    v = torch.randn(1, 8, 3, 4)
    with pytest.raises(ValueError, match="heads % key_heads"):
        chunk_linear_attention(q, q, v, torch.zeros(3))
    with pytest.raises(ValueError, match="log_decay"):
        chunk_linear_attention(q, q, torch.randn(1, 8, 4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_linear_attention(q, q, torch.randn(1, 8, 4, 4), torch.zeros(4), initial_state=torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_linear_attention(q, q, v[:, :, :2], torch.zeros(2), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="batch of one"):
        chunk_linear_attention(torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4),
                               torch.zeros(2), cu_seqlens=torch.tensor([0, 8]))
