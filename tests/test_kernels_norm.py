"""The norm family: PyTorch (torch_ops) and Triton (interpreter on CPU) against the plain references."""

import pytest
import torch
from torch import nn

from megamix.nn import GatedRMSNorm, RMSNorm, SRMSNorm, init_parameters
from megamix_kernels.norm import gated_rms_norm, naive, rms_norm, srms_norm
from megamix_kernels.norm.torch_ops import torch_norm
from megamix_kernels.norm.triton import triton_norm

EPS = 1e-6
IMPLEMENTATIONS = {"torch_ops": torch_norm, "triton": triton_norm}
# (op, dim, group_size): non-power-of-two dims, several groups and one group per row.
CASES = [("rms", 48, 48), ("rms", 200, 200), ("srms", 48, 48), ("srms", 200, 200),
         ("gated", 96, 32), ("gated", 96, 96)]


def norm_inputs(op: str, dim: int, dtype: torch.dtype, seed: int = 0):
    """x, z (or None) ``[5, 7, dim]`` (35 rows, not contiguous) in dtype, weight ``[dim]`` (at least fp32, or None)."""
    generator = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(7, 5, dim, generator=generator)).to(dtype).transpose(0, 1)
    z = torch.randn(7, 5, dim, generator=generator).to(dtype).transpose(0, 1) if op == "gated" else None
    weight = (1 + 0.5 * torch.randn(dim, generator=generator)).to(torch.promote_types(dtype, torch.float32))
    weight = weight if op != "srms" else None
    return x, z, weight


def reference(op: str, x, z, weight, group_size: int) -> torch.Tensor:
    if op == "gated":
        return naive.gated_rms_norm(x, z, weight, EPS, group_size)
    return naive.rms_norm(x, weight, EPS) if op == "rms" else naive.srms_norm(x, EPS)


def output_and_grads(fn, x, z, weight, grad_out):
    """fn(x, z, weight) and the gradients of (fn · grad_out).sum() for the tensors among x, z, weight."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, z, weight)]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_out)
    return [y, *grads]


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    error = (actual.double() - expected.double()).square().mean().sqrt()
    return (error / expected.double().square().mean().sqrt()).item()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("op,dim,group_size", CASES)
def test_fp32_outputs_and_gradients_equal_the_reference(implementation, op, dim, group_size):
    x, z, weight = norm_inputs(op, dim, torch.float32)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    impl = IMPLEMENTATIONS[implementation]
    actual = output_and_grads(lambda x, z, w: impl(x, z, w, EPS, group_size), x, z, weight, grad_out)
    expected = output_and_grads(lambda x, z, w: reference(op, x, z, w, group_size), x, z, weight, grad_out)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("op,dim,group_size", CASES)
def test_bf16_computes_in_fp32(implementation, op, dim, group_size):
    """bf16 x, z and fp32 weight: outputs and grads in their input dtypes, close to the fp32 reference
    on the same (bf16-rounded) values. The interpreter rounds fp32 → bf16 toward zero where a GPU
    rounds to nearest, which doubles the error here (about 3e-3 against 1.6e-3)."""
    x, z, weight = norm_inputs(op, dim, torch.bfloat16)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    impl = IMPLEMENTATIONS[implementation]
    actual = output_and_grads(lambda x, z, w: impl(x, z, w, EPS, group_size), x, z, weight, grad_out)
    upcast = [t.float() if t is not None else None for t in (x, z, weight, grad_out)]
    expected = output_and_grads(lambda x, z, w: reference(op, x, z, w, group_size), *upcast)
    inputs = [t for t in (x, x, z, weight) if t is not None]  # y has x's dtype, each gradient its input's
    for a, e, source in zip(actual, expected, inputs, strict=True):
        assert a.dtype == source.dtype
        assert relative_rmse(a, e) < 5e-3


@pytest.mark.parametrize("op,dim,group_size", [("rms", 12, 12), ("srms", 12, 12), ("gated", 12, 4)])
def test_torch_ops_backward_passes_gradcheck(op, dim, group_size):
    x, z, weight = (t.requires_grad_() if t is not None else None for t in norm_inputs(op, dim, torch.float64))
    assert torch.autograd.gradcheck(lambda x, z, w: torch_norm(x, z, w, EPS, group_size), (x, z, weight))


def test_public_ops_and_modules_match_the_references():
    x, z, weight = norm_inputs("gated", 96, torch.float32)
    torch.testing.assert_close(rms_norm(x, weight, EPS), naive.rms_norm(x, weight, EPS))
    torch.testing.assert_close(srms_norm(x, EPS), naive.srms_norm(x, EPS))
    torch.testing.assert_close(gated_rms_norm(x, z, weight, EPS, 32), naive.gated_rms_norm(x, z, weight, EPS, 32))
    model = nn.ModuleDict({"norm": RMSNorm(96, EPS), "gated": GatedRMSNorm(96, 32, EPS), "srms": SRMSNorm(96, EPS)})
    init_parameters(model, seed=0, std=0.02, num_layers=1)
    assert all(torch.equal(p, torch.ones(96)) for p in model.parameters())
    assert len(list(model["srms"].parameters())) == 0
    torch.testing.assert_close(model["norm"](x), naive.rms_norm(x, torch.ones(96), EPS))
    torch.testing.assert_close(model["gated"](x, z), naive.gated_rms_norm(x, z, torch.ones(96), EPS, 32))
    torch.testing.assert_close(model["srms"](x), naive.srms_norm(x, EPS))


def test_bad_shapes_are_refused():
    x = torch.randn(3, 96)
    with pytest.raises(ValueError, match="does not divide"):
        gated_rms_norm(x, x, torch.ones(96), EPS, 40)
    with pytest.raises(ValueError, match="gate shape"):
        gated_rms_norm(x, x[:, :48], torch.ones(96), EPS, 32)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(48), EPS)
    with pytest.raises(ValueError, match="does not divide"):
        GatedRMSNorm(96, 40, EPS)
