"""Mixture-of-head attention (pattern ``H``): the gates of the MoH paper, equality with standard
attention when every head is active, the load-balance loss, and tensor parallelism equal to one process.

Shapes are small and not powers of two: 8 heads of 10 over 2 kv heads (GQA, 4 query heads per kv
head), hidden 40, 22 tokens.
"""

import math
from unittest.mock import patch

import pytest
import torch
from test_parallel import full_gradients

from megamix.errors import ConfigError
from megamix.nn import Attention, ForwardContext, init_parameters, moh, rotary_tables
from megamix.nn.moh import MoHAttention
from megamix.parallel import (
    NO_TENSOR_PARALLEL,
    Group,
    ParallelState,
    TensorParallel,
    record_communication,
)
from megamix.parallel.context_parallel import SequenceLayout
from megamix.testing import run_distributed

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 40, 8, 2, 10
BATCH, SEQ = 2, 22
# The head layout of the class docstring: 2 shared + 6 routed is S R R R S R R R, 4 + 4 is S R S R S R S R.
SHARED_HEADS = {2: [0, 4], 4: [0, 2, 4, 6]}
STD = 0.3  # large enough for decisive routing and gates far from uniform


def build(shared: int, top_k: int, aux_loss_coeff: float = 0.0, tp: TensorParallel = NO_TENSOR_PARALLEL):
    layer = MoHAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, shared, top_k, aux_loss_coeff, "layers.0", tp)
    init_parameters(layer, seed=1, std=STD, num_layers=2)
    return layer


def context() -> ForwardContext:
    cos, sin = rotary_tables(torch.arange(SEQ), HEAD_DIM, 10000.0)
    return ForwardContext(cos, sin, SequenceLayout(SEQ))


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(seed))


def reference_moh(layer: MoHAttention, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The paper's formulas, head by head: y = Σ_i g_i W_outⁱ softmax(q_i k_iᵀ / √d + causal mask) v_i."""
    s, r = layer.shared_heads, layer.routed_heads
    shared_logits, routed_logits, balance_logits = (x @ layer.router.weight.T).split([s, r, 2], dim=-1)
    alpha = balance_logits.softmax(dim=-1)
    p = routed_logits.softmax(dim=-1)
    top = p.topk(layer.top_k, dim=-1)
    routed = torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(dim=-1, keepdim=True))
    shared_heads = SHARED_HEADS[s]
    routed_heads = [h for h in range(HEADS) if h not in shared_heads]
    gates = {h: alpha[..., 0] * shared_logits.softmax(dim=-1)[..., i] for i, h in enumerate(shared_heads)}
    gates |= {h: alpha[..., 1] * routed[..., j] for j, h in enumerate(routed_heads)}

    q, k, v = (x @ layer.qkv_proj.weight.T).unflatten(-1, (-1, HEAD_DIM)).split([HEADS, KV_HEADS, KV_HEADS], dim=2)
    cos, sin = ctx.rope_cos[:, None], ctx.rope_sin[:, None]  # rotate-half rope: x·cos + roll(x, d/2)·sin
    q, k = (t * cos + t.roll(HEAD_DIM // 2, dims=-1) * sin for t in (q, k))
    future = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    y = 0
    for h in range(HEADS):
        kv = h // (HEADS // KV_HEADS)
        scores = (q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(HEAD_DIM)).masked_fill(future, -math.inf)
        head = scores.softmax(dim=-1) @ v[:, :, kv]
        y = y + gates[h][..., None] * head @ layer.out_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].T
    return y


@pytest.mark.parametrize("shared, top_k", [(2, 6), (2, 2), (2, 1), (4, 3)],
                         ids=["all-heads-active", "top2-of-6", "top1-of-6", "4-shared-top3-of-4"])
@pytest.mark.parametrize("path", ["dense", "gathered"])
def test_output_and_gradients_follow_the_moh_formulas(monkeypatch, shared, top_k, path):
    """With top_k = all routed heads, every head is active: MoH is standard attention whose head
    outputs are scaled by the two-stage gates. Both ways of computing the heads are checked."""
    monkeypatch.setattr(moh, "GATHER_MAX_FRACTION", 1.0 if path == "gathered" else 0.0)
    layer = build(shared, top_k)
    ctx = context()
    x = inputs().requires_grad_()
    upstream = inputs(seed=1)
    y = layer(x, ctx)
    (y * upstream).sum().backward()
    actual_grads = {name: p.grad for name, p in layer.named_parameters()}
    actual_dx, x.grad = x.grad, None
    layer.zero_grad()
    expected = reference_moh(layer, x, ctx)
    (expected * upstream).sum().backward()
    assert expected.abs().mean() > 0.1, "outputs too small for the tolerance to mean anything"
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # gradients sum more terms, in another order than the reference's
    torch.testing.assert_close(actual_dx, x.grad, rtol=1e-4, atol=1e-5)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(actual_grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_every_head_active_with_a_zero_router_is_standard_attention():
    """A zero router makes every gate a constant: α = ½ and softmax = 1/s over the shared heads,
    1/r over the routed ones (all of them kept). Dividing each head's W_out columns by its constant
    gives exactly the `Attention` layer with the original weights."""
    shared, routed = 2, 6
    attention = Attention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM)
    init_parameters(attention, seed=1, std=STD, num_layers=2)
    layer = build(shared, top_k=routed)
    gate = torch.tensor([1 / (2 * shared) if h in SHARED_HEADS[shared] else 1 / (2 * routed) for h in range(HEADS)])
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.qkv_proj.weight.copy_(attention.qkv_proj.weight)
        layer.out_proj.weight.copy_(attention.out_proj.weight / gate.repeat_interleave(HEAD_DIM))
    x, ctx = inputs(), context()
    torch.testing.assert_close(layer(x, ctx), attention(x, ctx), rtol=1e-5, atol=1e-6)
    router_flops = 2 * HIDDEN * (HEADS + 2)
    assert layer.flops_per_token(SEQ) == attention.flops_per_token(SEQ) + router_flops


def test_flops_count_only_the_active_heads_attention():
    dense, sparse = build(2, top_k=6), build(2, top_k=2)
    one_head_attention = 2 * 2 * HEAD_DIM * SEQ
    assert dense.flops_per_token(SEQ) - sparse.flops_per_token(SEQ) == 4 * one_head_attention


def test_load_balance_loss_and_active_heads_are_reported_and_trained():
    """L = r · Σ_j f_j P_j is recorded, and backward gives the router coefficient · ∂L/∂W_router
    (here alone: the output's own gradient is zero)."""
    coeff = 0.3
    layer = build(2, top_k=2, aux_loss_coeff=coeff)
    x, ctx = inputs(), context()
    (0 * layer(x, ctx)).sum().backward()
    recorded = ctx.aux.pop()

    routed_logits = (x @ layer.router.weight.T)[..., 2:HEADS]
    p = routed_logits.softmax(dim=-1)
    chosen = torch.nn.functional.one_hot(p.topk(2, dim=-1).indices, 6).sum(dim=2).float()
    expected_loss = 6 * (chosen.mean(dim=(0, 1)) / 2 * p.mean(dim=(0, 1))).sum()
    assert recorded["moh_aux_loss"].item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert recorded["moh_active_heads"].item() == pytest.approx(4 / 8)
    (loss_grad,) = torch.autograd.grad(expected_loss, layer.router.weight)
    torch.testing.assert_close(layer.router.weight.grad, coeff * loss_grad)


def test_uniform_routing_has_load_balance_loss_one():
    layer = build(2, top_k=3)
    with torch.no_grad():
        layer.router.weight.zero_()
    ctx = context()
    layer(inputs(), ctx)
    assert ctx.aux.pop()["moh_aux_loss"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("shared, top_k, tp, message", [
    (0, 2, 1, r"layers.0: MoH needs 1 <= shared_heads < num_heads \(8\), got 0"),
    (8, 1, 1, r"MoH needs 1 <= shared_heads < num_heads \(8\), got 8"),
    (2, 7, 1, r"MoH needs 1 <= routed_top_k <= the 6 routed heads, got 7"),
    (2, 2, 4, r"the 2 shared and 6 routed MoH heads must each be divisible by the tensor-parallel size 4"),
])
def test_head_splits_the_layer_cannot_take_are_refused(shared, top_k, tp, message):
    with pytest.raises(ConfigError, match=message):
        MoHAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, shared, top_k, 0.0, "layers.0",
                     TensorParallel(Group(None, 0, tp)))


def tp_forward_backward(tp, sequence_parallel, shared, top_k, gather_max_fraction):
    """Output, input gradient, global parameter gradients, recorded values and collectives of one
    forward+backward of the layer on a fixed batch (the output and input gradient of this rank's
    sequence shard under SP)."""
    parallel = ParallelState.create(tp=tp, sequence_parallel=sequence_parallel)
    layer = build(shared, top_k, aux_loss_coeff=0.1, tp=parallel.tensor_parallel)
    shard = SEQ // tp if sequence_parallel else SEQ
    mine = slice(parallel.tp.rank * shard, (parallel.tp.rank + 1) * shard) if sequence_parallel else slice(None)
    x = inputs()[:, mine].requires_grad_()
    ctx = context()
    with patch.object(moh, "GATHER_MAX_FRACTION", gather_max_fraction), record_communication() as recorder:
        y = layer(x, ctx)
        forward = recorder.kinds()
        (y * inputs(seed=1)[:, mine]).sum().backward()
    communication = (dict(forward), dict(recorder.kinds() - forward))
    recorded = {name: value.item() for name, value in ctx.aux.pop().items()}
    return y.detach(), x.grad, full_gradients(layer, parallel), recorded, communication


@pytest.mark.parametrize("tp, sequence_parallel, shared, top_k, gather_max_fraction", [
    (2, False, 2, 2, 1.0),
    (2, False, 2, 2, 0.0),
    (2, True, 2, 1, 1.0),
    (4, False, 4, 2, 1.0),  # 2 kv heads on 4 ranks: each kv head replicated on 2 ranks
], ids=["tp2-gathered", "tp2-dense", "tp2-sp", "tp4-kv-replicated"])
def test_tensor_parallel_equals_one_process(tp, sequence_parallel, shared, top_k, gather_max_fraction):
    """Outputs and the global gradients (the load-balance loss's included) equal tp=1, with exactly the
    collectives of standard attention: the replicated router needs no communication of its own."""
    y_ref, dx_ref, grads_ref, recorded_ref, _ = tp_forward_backward(1, False, shared, top_k, gather_max_fraction)
    results = run_distributed(tp_forward_backward, tp, tp, sequence_parallel, shared, top_k, gather_max_fraction)
    if sequence_parallel:  # each rank holds its sequence shard
        outputs = [(torch.cat([r[0] for r in results], dim=1), torch.cat([r[1] for r in results], dim=1))]
        expected_communication = {"all_gather": 1, "reduce_scatter": 1}
    else:  # each rank holds the whole
        outputs = [result[:2] for result in results]
        expected_communication = {"all_reduce": 1}
    for y, dx in outputs:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    for _, _, grads, recorded, communication in results:
        assert grads.keys() == grads_ref.keys()
        for name, grad in grads.items():
            # summed over ranks in another order: rounding of gradients up to ~20
            torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)
        assert recorded == pytest.approx(recorded_ref)
        assert communication == (expected_communication, expected_communication)

