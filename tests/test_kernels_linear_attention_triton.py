"""The Triton linear-attention kernels (interpreted on CPU) against the float64 references.

Outputs, final states and the gradients of q, k, v, log_decay and the initial state, on lengths that are
not multiples of the block (16 under the interpreter), head dims that are not powers of two, both decay
forms, key groups, several value tiles (32 columns each under the interpreter) and packed sequences.
"""

import functools
import itertools

import pytest
import torch
from linear_attention_cases import assert_results_close, relative_max_error, relative_rmse, run
from linear_attention_cases import make_inputs as make_cpu_inputs

from megamix_kernels.linear_attention.naive import linear_attention_full, linear_attention_recurrent
from megamix_kernels.linear_attention.triton import triton_linear_attention

# Under the interpreter the kernels take CPU tensors; with a GPU they compile and take CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# q scaled by key_dim**-0.5 like k, so the scores stay near unit size.
make_inputs = functools.partial(make_cpu_inputs, scale_q=True, device=DEVICE)


@pytest.mark.parametrize(
    "seq, key_heads, heads, key_dim, value_dim, per_token_decay, decay_rate, initial_state, final_state",
    [
        (37, 1, 2, 24, 48, True, 0.5, True, True),  # Mamba-2-like: one B/C group, per-token decay
        (70, 2, 4, 48, 24, False, 0.5, True, True),  # Lightning-like: constant decay, key groups of 2
        (64, 2, 2, 16, 64, True, 4.0, False, True),  # whole blocks, strong decay (e^{G} down to ~e^{-64})
        (45, 1, 1, 32, 40, False, 0.05, True, False),  # initial state without returning the final state
    ],
)
def test_fp32_matches_reference(seq, key_heads, heads, key_dim, value_dim, per_token_decay, decay_rate,
                                initial_state, final_state):
    inputs = make_inputs(2, seq, key_heads, heads, key_dim, value_dim, per_token_decay, decay_rate=decay_rate)
    options = {"scale": 0.7, "initial_state": initial_state, "final_state": final_state}
    expected = run(linear_attention_full, inputs, torch.float64, **options)
    actual = run(triton_linear_attention, inputs, torch.float32, **options)
    assert_results_close(actual, expected, 1e-4, relative_max_error)


def test_references_agree():
    """The full-matrix reference the other tests use equals the token-by-token recurrence."""
    inputs = make_inputs(1, 21, 1, 2, 24, 16, per_token_decay=True)
    full = run(linear_attention_full, inputs, torch.float64, scale=1.0)
    recurrent = run(linear_attention_recurrent, inputs, torch.float64, scale=1.0)
    assert_results_close(full, recurrent, 1e-5, relative_max_error)  # step keeps the state in fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_close_to_fp32_reference(dtype):
    inputs = make_inputs(2, 53, 1, 2, 48, 40, per_token_decay=True)
    rounded = {name: t.to(dtype).double() if name in ("q", "k", "v") else t for name, t in inputs.items()}
    expected = run(linear_attention_full, rounded, torch.float32, scale=0.8)
    actual = run(triton_linear_attention, inputs, dtype, scale=0.8)
    assert all(actual[name].dtype == dtype for name in ("o", "dq", "dk", "dv"))
    assert actual["final_state"].dtype == torch.float32
    assert_results_close(actual, expected, 5e-3, relative_rmse)


def test_backward_saves_only_inputs():
    """Memory O(seq): what autograd keeps for backward is no larger than the inputs themselves."""
    inputs = make_inputs(1, 70, 1, 2, 24, 40, per_token_decay=True)
    leaves = [inputs[name].float().requires_grad_() for name in ("q", "k", "v", "log_decay", "initial_state")]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        triton_linear_attention(*leaves[:4], 1.0, leaves[4], True)
    assert 0 < sum(saved) <= sum(t.numel() for t in leaves)


def per_document(fn):
    """``fn`` run on each packed sequence separately, results joined along seq (outputs) and sequences
    (states), as the kernels must produce for the packed batch."""

    def packed(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens):
        bounds = cu_seqlens.tolist()
        outputs, finals = [], []
        for n, (start, end) in enumerate(itertools.pairwise(bounds)):
            decay = log_decay[:, start:end] if log_decay.dim() == 3 else log_decay
            o, final = fn(q[:, start:end], k[:, start:end], v[:, start:end], decay, scale,
                          initial_state[n : n + 1], True, None)
            outputs.append(o)
            finals.append(final)
        return torch.cat(outputs, dim=1), torch.cat(finals)

    return packed


@pytest.mark.parametrize("per_token_decay", [True, False])
def test_varlen_matches_per_document_loop(per_token_decay):
    # Lengths 1, 16 (one whole block), 0, 33 and 19 (several blocks each, partial last blocks); blocks align
    # to each sequence start, which is not a multiple of the block here.
    cu_seqlens = torch.tensor([0, 1, 17, 17, 50, 69], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, 69, 1, 2, 24, 40, per_token_decay, sequences=5)
    expected = run(per_document(linear_attention_full), inputs, torch.float64, scale=0.6, cu_seqlens=cu_seqlens)
    actual = run(triton_linear_attention, inputs, torch.float32, scale=0.6, cu_seqlens=cu_seqlens)
    assert_results_close(actual, expected, 1e-4, relative_max_error)
