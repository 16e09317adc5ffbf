"""Shared helpers for the linear-attention kernel tests: inputs, a forward + backward run, and error checks."""

import torch

NAMES = ("o", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state")


def make_inputs(batch, seq, key_heads, heads, key_dim, value_dim, per_token_decay, sequences=None,
                decay_rate=0.5, seed=0, scale_q=False, device="cpu"):
    """float64 q, k, v, log_decay (in [−decay_rate, 0]), initial_state, and upstream gradients for o and
    the final state, on ``device``. k is scaled by key_dim**-0.5, and q too with ``scale_q``."""
    gen = torch.Generator().manual_seed(seed)
    sequences = batch if sequences is None else sequences

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    decay_shape = (batch, seq, heads) if per_token_decay else (heads,)
    inputs = {
        "q": randn(batch, seq, key_heads, key_dim) * (key_dim**-0.5 if scale_q else 1.0),
        "k": randn(batch, seq, key_heads, key_dim) * key_dim**-0.5,
        "v": randn(batch, seq, heads, value_dim),
        "log_decay": -decay_rate * torch.rand(*decay_shape, generator=gen, dtype=torch.float64),
        "initial_state": randn(sequences, heads, key_dim, value_dim),
        "grad_o": randn(batch, seq, heads, value_dim),
        "grad_final": randn(sequences, heads, key_dim, value_dim),
    }
    return {name: t.to(device) for name, t in inputs.items()}


def run(fn, inputs, dtype=torch.float32, scale=0.7, initial_state=True, final_state=True, cu_seqlens=None,
        **kwargs):
    """Outputs and input gradients of ``fn`` on CPU, named as in NAMES (None where not asked for); ``kwargs``
    go on to ``fn``. q, k, v go in as ``dtype``, log_decay and the initial state as fp32 (float64 with a
    float64 dtype)."""
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    dtypes = {"q": dtype, "k": dtype, "v": dtype, "log_decay": state_dtype, "initial_state": state_dtype}
    leaves = {name: inputs[name].to(dtypes[name], copy=True).requires_grad_() for name in dtypes}
    if not initial_state:
        leaves["initial_state"] = None
    o, final = fn(leaves["q"], leaves["k"], leaves["v"], leaves["log_decay"], scale, leaves["initial_state"],
                  final_state, cu_seqlens, **kwargs)
    loss = (o.double() * inputs["grad_o"]).sum()
    if final_state:
        loss = loss + (final.double() * inputs["grad_final"]).sum()
    loss.backward()
    grads = [None if leaf is None else leaf.grad
             for leaf in (leaves[name] for name in ("q", "k", "v", "log_decay", "initial_state"))]
    return {name: None if r is None else r.detach().cpu() for name, r in zip(NAMES, [o, final, *grads])}


def relative_max_error(actual, expected):
    """Largest absolute error over the largest magnitude of ``expected``."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def relative_rmse(actual, expected):
    """Norm of the error over the norm of ``expected``."""
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_results_close(actual, expected, max_error, metric=relative_max_error):
    """Each result of ``run`` has the expected shape (or is None with it) and ``metric`` below ``max_error``."""
    for name in NAMES:
        if expected[name] is None:
            assert actual[name] is None, name
            continue
        assert actual[name].shape == expected[name].shape, name
        error = metric(actual[name].double(), expected[name].double())
        assert error < max_error, f"{name}: error {error:.2e} ≥ {max_error:.0e}"
