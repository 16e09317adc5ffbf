"""The MoE layer: routing and balancing losses against numbers worked out by hand, the grouped
experts against the loop over experts, and expert / tensor / sequence parallel against one process
(gloo, CPU worker processes)."""

import math

import pytest
import torch

from megamix.config import load_config
from megamix.errors import ConfigError
from megamix.nn.context import ForwardContext
from megamix.nn.moe import MoE, sort_by_expert, top_k_routing
from megamix.parallel import (
    ParallelState,
    mark_sequence_parallel,
    record_communication,
    sharding_of,
)
from megamix.parallel.comm import all_reduce
from megamix.parallel.context_parallel import SequenceLayout
from megamix.parallel.sharding import full_tensor, sum_partial_gradient
from megamix.testing import run_distributed


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Equal up to fp32 rounding of sums taken in another order: 1e-6 of the tensor's largest entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(), msg=msg)


def context() -> ForwardContext:
    return ForwardContext(rope_cos=torch.empty(0), rope_sin=torch.empty(0), sequence=SequenceLayout(1))


def randomize(layer: MoE, seed: int = 0) -> MoE:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return layer


def logit_layer(num_experts: int = 4, **options) -> MoE:
    """A layer whose router logits are its input (hidden = E, router = identity), random experts."""
    layer = randomize(MoE(num_experts, 8, num_experts, options.pop("top_k", 2), **options))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(num_experts))
    return layer


# ---------------------------------------------------------------------------
# Routing and balancing, by hand


def test_top_k_routing_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.25, 0.15, 0.2]])
    indices, weights = top_k_routing(scores, torch.zeros(4), 2, normalize=False)
    assert indices.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.3], [0.4, 0.25]]))
    _, weights = top_k_routing(scores, torch.zeros(4), 2, normalize=True)
    torch.testing.assert_close(weights, torch.tensor([[0.5 / 0.8, 0.3 / 0.8], [0.4 / 0.65, 0.25 / 0.65]]))
    # The balancing bias moves the selection (s + b: [.1 .5 .6 .1], [.4 .25 .45 .2]); the weights stay s.
    indices, weights = top_k_routing(scores, torch.tensor([0.0, 0.0, 0.3, 0.0]), 2, normalize=False)
    assert indices.tolist() == [[2, 1], [2, 0]]
    torch.testing.assert_close(weights, torch.tensor([[0.3, 0.5], [0.15, 0.4]]))


def test_group_limited_routing_by_hand():
    # 8 experts in 4 groups of 2; group scores (sum of the best two): 0.9, 0.95, 0.7, 0.6 → groups 1 and 0
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.45, 0.6, 0.1, 0.3, 0.3]])
    indices, weights = top_k_routing(scores, torch.zeros(8), 2, normalize=False)
    assert indices.tolist() == [[0, 4]]  # without groups: expert 4 (group 2)
    indices, weights = top_k_routing(scores, torch.zeros(8), 2, normalize=True, num_groups=4, top_k_groups=2,
                                     scaling_factor=2.5)
    assert indices.tolist() == [[0, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.9 / 1.4 * 2.5, 0.5 / 1.4 * 2.5]]))
    # the bias takes part in scoring the groups: +0.4 on expert 6 puts group 3 first (1.0), so the experts
    # come from groups 3 and 1, chosen by s + b; the weights stay s
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.4, 0.0])
    indices, weights = top_k_routing(scores, bias, 2, normalize=False, num_groups=4, top_k_groups=2)
    assert indices.tolist() == [[6, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.3, 0.5]]))


# Softmax probabilities of 2 sequences × 2 tokens over 4 experts; top-2: {0,1} {1,2} | {0,3} {3,0}.
PROBS = torch.tensor([[[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]],
                      [[0.45, 0.1, 0.05, 0.4], [0.3, 0.1, 0.2, 0.4]]])
LOGSUMEXP = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])  # softmax(log p + c) = p, logsumexp = c


@pytest.mark.parametrize("aux_loss_type, expected", [
    # micro-batch: load [3, 2, 1, 2] of T = 4 tokens, probability sums [1.35, 1.1, 0.55, 1.0]:
    #   E/k · Σ (load/T)(sum/T) = 2 · (3·1.35 + 2·1.1 + 1·0.55 + 2·1.0) / 16 = 1.1
    ("batch", 1.1),
    # sequence 0: load [1, 2, 1, 0], sums [0.6, 0.9, 0.3, 0.2] → 2 · (0.6 + 1.8 + 0.3) / 4 = 1.35
    # sequence 1: load [2, 0, 0, 2], sums [0.75, 0.2, 0.25, 0.8] → 2 · (1.5 + 1.6) / 4 = 1.55; mean 1.45
    ("sequence", 1.45),
])
def test_switch_aux_loss_and_z_loss_by_hand(aux_loss_type, expected):
    layer = logit_layer(aux_loss_type=aux_loss_type)
    ctx = context()
    layer(PROBS.log() + LOGSUMEXP[..., None], ctx)
    metrics = ctx.aux.pop()
    assert metrics["moe_aux_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert metrics["moe_z_loss"].item() == pytest.approx((1 + 4 + 1 + 0) / 4, rel=1e-6)  # mean of c²
    assert metrics["moe_load_imbalance/moe"].item() == pytest.approx(3 / 2)  # max / mean of [3, 2, 1, 2]


def test_sigmoid_scores_by_hand():
    # sigmoid(±log 3) = 0.75 / 0.25, sigmoid(0) = 0.5; top-1 picks expert 0, then expert 1
    log3 = math.log(3)
    logits = torch.tensor([[[log3, 0.0, -log3, -log3], [0.0, log3, 0.0, -log3]]])
    layer = logit_layer(top_k=1, score="sigmoid", normalize_top_k=False)
    ctx = context()
    y = layer(logits, ctx)
    # the combine weight is the raw score 0.75, not the normalised 1
    torch.testing.assert_close(y[0, 0], 0.75 * layer.experts["0"](logits[:, :1], ctx)[0, 0])
    torch.testing.assert_close(y[0, 1], 0.75 * layer.experts["1"](logits[:, 1:], ctx)[0, 0])
    # P uses the scores normalised over experts: [3, 2, 1, 1]/7 and [2, 3, 2, 1]/8; load [1, 1, 0, 0]
    # E/k · Σ (load/T)(sum/T) = 4 · ((3/7 + 2/8) + (2/7 + 3/8)) / 4
    expected = 3 / 7 + 2 / 8 + 2 / 7 + 3 / 8
    assert ctx.aux.pop()["moe_aux_loss"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("capacity, drop_policy, order, counts", [
    (None, "probability", [0, 3, 4, 1, 2, 5], [3, 2, 1]),  # dropless: by expert, then by token
    (2, "probability", [0, 4, 2, 1, 5], [2, 2, 1]),  # expert 0 drops its lowest score (0.2)
    (2, "position", [0, 3, 1, 2, 5], [2, 2, 1]),  # expert 0 drops its last token (token 2)
])
def test_sort_by_expert_drops_over_capacity(capacity, drop_policy, order, counts):
    # assignments (flat index: token, expert, score): 0: t0 e0 .5, 1: t0 e1 .3, 2: t1 e1 .6,
    # 3: t1 e0 .2, 4: t2 e0 .4, 5: t2 e2 .1
    indices = torch.tensor([[0, 1], [1, 0], [0, 2]])
    scores = torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.4, 0.1]])
    kept, kept_counts = sort_by_expert(indices, scores, 3, capacity, drop_policy)
    assert kept.tolist() == order and kept_counts.tolist() == counts


@pytest.mark.parametrize("drop_policy, kept_token", [("probability", 2), ("position", 0)])
def test_capacity_drops_tokens_from_the_layer_output(drop_policy, kept_token):
    # 4 tokens all choose expert 0 (top-1, combine weight 1); capacity ⌈1.0 · 4 · 1 / 4⌉ = 1 keeps the
    # token of highest score (0.9) or the first
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2], [0.9, 0.05, 0.03, 0.02], [0.5, 0.2, 0.2, 0.1]])
    x = probs.log()[None]
    layer = logit_layer(top_k=1, capacity_factor=1.0, drop_policy=drop_policy)
    y = layer(x, context())[0]
    for token in range(4):
        kept = layer.experts["0"](x[:, token:token + 1], context())[0, 0]
        torch.testing.assert_close(y[token], kept if token == kept_token else torch.zeros_like(kept))


def test_expert_bias_updates_towards_balance():
    layer = MoE(4, 8, 4, 1, bias_update_rate=0.1)
    counts = torch.tensor([5, 1, 0, 2])  # mean 2
    layer.tokens_per_expert += counts
    layer.update_expert_bias(counts)
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.0]))
    assert layer.tokens_per_expert.tolist() == [0, 0, 0, 0]

    # a router skewed towards experts 0 and 1 on a fixed batch: the updates even out the load
    layer = logit_layer(top_k=1, bias_update_rate=0.05)
    x = torch.randn(4, 32, 4, generator=torch.Generator().manual_seed(1)) + torch.tensor([2.0, 1.0, 0.0, 0.0])

    def imbalance():
        ctx = context()
        with torch.no_grad():
            layer(x, ctx)
        return ctx.aux.pop()["moe_load_imbalance/moe"].item()

    before = imbalance()
    assert layer.tokens_per_expert.sum().item() == 4 * 32  # training forwards count the load
    layer.update_expert_bias(layer.tokens_per_expert.clone())
    for _ in range(20):
        imbalance()
        layer.update_expert_bias(layer.tokens_per_expert.clone())
    layer.eval()
    after = imbalance()
    assert layer.tokens_per_expert.sum().item() == 0  # evaluation forwards do not
    assert before > 2.5 and after < 1.3, (before, after)


# ---------------------------------------------------------------------------
# Grouped experts equal the loop over experts


def loop_over_experts(layer: MoE, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The layer's definition, y = Σ_e g_e(x) · FFN_e(x) + FFN_shared(x), with every expert run on
    every token and g_e(x) the combine weight of e (0 where e is not among the token's top k)."""
    logits = x @ layer.router.weight.T
    scores = logits.softmax(-1) if layer.score == "softmax" else logits.sigmoid()
    indices, weights = top_k_routing(scores, layer.expert_bias, layer.top_k, layer.normalize_top_k,
                                     layer.num_groups, layer.top_k_groups, layer.routed_scaling_factor)
    y = layer.shared_experts(x, ctx) if layer.shared_experts is not None else 0
    for name, expert in layer.experts.items():
        gate = (weights * (indices == int(name))).sum(-1, keepdim=True)
        y = y + gate * expert(x, ctx)
    return y


@pytest.mark.parametrize("hidden, ffn, options", [
    (16, 24, {"shared_ffn_hidden_size": 24}),
    (10, 6, {"score": "sigmoid"}),  # widths padded to 16 bytes for the grouped matmul
    (12, 20, {"normalize_top_k": False, "shared_ffn_hidden_size": 40}),
    (16, 24, {"kind": "relu2", "score": "sigmoid", "num_groups": 3, "top_k_groups": 2, "routed_scaling_factor": 2.5,
              "shared_ffn_hidden_size": 40}),  # Nemotron-H's MoE
], ids=["softmax-shared", "sigmoid-odd-widths", "unnormalized", "relu2-groups-scaled"])
def test_grouped_experts_equal_the_loop_over_experts(hidden, ffn, options):
    layer = randomize(MoE(hidden, ffn, 6, 2, **options))
    layer.expert_bias[5] = -100.0  # no token picks expert 5
    x = torch.randn(3, 7, hidden, generator=torch.Generator().manual_seed(1))
    g = torch.randn(3, 7, hidden, generator=torch.Generator().manual_seed(2))
    results = []
    for forward in (layer, lambda x, ctx: loop_over_experts(layer, x, ctx)):
        layer.zero_grad()
        x_in = x.clone().requires_grad_()
        y = forward(x_in, context())
        (y * g).sum().backward()
        results.append((y, x_in.grad, {name: p.grad.clone() for name, p in layer.named_parameters()}))
    (y, x_grad, grads), (y_loop, x_grad_loop, grads_loop) = results
    assert_close(y, y_loop)
    assert_close(x_grad, x_grad_loop)
    for name, grad in grads.items():
        assert_close(grad, grads_loop[name], msg=name)
    idle = [grad for name, grad in grads.items() if name.startswith("experts.5.")]
    assert len(idle) == 2 and not any(grad.any() for grad in idle)


def test_bf16_autocast_runs_the_experts_in_bf16():
    layer = randomize(MoE(16, 24, 4, 2, shared_ffn_hidden_size=24))
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    reference = layer(x, context())
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, context())
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(p.grad.isfinite().all() for p in layer.parameters()) and x.grad.isfinite().all()
    assert (y.float() - reference).norm() < 0.02 * reference.norm()


def test_flops_per_token_count_the_router_and_the_active_experts():
    layer = MoE(16, 24, 8, 2, shared_ffn_hidden_size=24)
    assert layer.flops_per_token(32) == 2 * 16 * 8 + (2 + 1) * 2 * 3 * 16 * 24


# ---------------------------------------------------------------------------
# Expert, tensor and sequence parallel equal one process

SIZES = {"hidden_size": 16, "ffn_hidden_size": 24, "num_experts": 4, "top_k": 2}
OPTIONS = {"aux_loss_coeff": 0.1, "z_loss_coeff": 0.01, "shared_ffn_hidden_size": 24}


def batch(index: int, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output-gradient weights of data-parallel rank ``index``'s micro-batch."""
    generator = torch.Generator().manual_seed(100 + index)
    return torch.randn(2, seq, 16, generator=generator), torch.randn(2, seq, 16, generator=generator)


def reference_layer(options: dict, bias: list[float]) -> MoE:
    layer = randomize(MoE(**SIZES, **(OPTIONS | options)))
    layer.expert_bias.copy_(torch.tensor(bias))
    return layer


def parallel_forward_backward(tp, ep, sequence_parallel, options, bias):
    """This rank's output and input gradient on its micro-batch (its sequence shard under SP), the
    global gradients of its parameters (summed over the data-parallel ranks, as the optimizer
    would), router.weight's raw gradient, the metrics and the all-to-alls of forward and backward."""
    parallel = ParallelState.create(tp=tp, ep=ep, sequence_parallel=sequence_parallel)
    tensor_parallel = parallel.tensor_parallel
    reference = reference_layer(options, bias)
    layer = MoE(**SIZES, **(OPTIONS | options), tp=tensor_parallel, ep=parallel.ep)
    mark_sequence_parallel(layer, tensor_parallel)
    full = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(sharding_of(param, tp).take(full[name]))
        layer.expert_bias.copy_(reference.expert_bias)
    x, g = batch(parallel.dp.rank)
    if sequence_parallel:
        x, g = x.chunk(tp, dim=1)[parallel.tp.rank], g.chunk(tp, dim=1)[parallel.tp.rank]
    x.requires_grad_()
    ctx = context()
    with record_communication() as recorder:
        y = layer(x, ctx)
        forward = recorder.kinds()
        (y * g).sum().backward()
    all_to_alls = forward["all_to_all"], (recorder.kinds() - forward)["all_to_all"]
    raw_router_grad = layer.router.weight.grad.clone()
    grads = {}
    for name, param in layer.named_parameters():
        sharding = sharding_of(param, tp)
        if sharding.partial_grads:
            sum_partial_gradient(param.grad, sharding, parallel.tp)
        all_reduce(param.grad, parallel.expert_dp if sharding.expert_parallel else parallel.dp)
        grads[name] = full_tensor(param.grad, sharding, parallel.tp)
    return y.detach(), x.grad, grads, raw_router_grad, ctx.aux.pop(), all_to_alls


ROUTE_ALL_TO_RANK_0 = [10.0, 10.0, 0.0, 0.0]  # every token picks experts 0 and 1, held by ep rank 0
ONE_IDLE_EXPERT_PER_RANK = [10.0, 0.0, 10.0, 0.0]  # experts 1 and 3 get no token


@pytest.mark.parametrize("world, tp, ep, sequence_parallel, options, bias", [
    (2, 1, 2, False, {}, [0.0] * 4),
    (2, 1, 2, False, {}, ROUTE_ALL_TO_RANK_0),
    (2, 1, 2, False, {"capacity_factor": 1.0, "drop_policy": "position"}, ONE_IDLE_EXPERT_PER_RANK),
    (2, 2, 1, True, {"score": "sigmoid", "aux_loss_type": "sequence"}, [0.0] * 4),
    (4, 2, 2, False, {"capacity_factor": 1.0}, [0.0] * 4),
    (4, 2, 2, True, {}, ROUTE_ALL_TO_RANK_0),
    (4, 2, 2, False, {"kind": "relu2", "score": "sigmoid", "num_groups": 2, "routed_scaling_factor": 2.5,
                      "shared_ffn_hidden_size": 40}, [0.0] * 4),
], ids=["ep2", "ep2-idle-rank", "ep2-idle-experts-capacity", "tp2-sp-sigmoid", "ep2xtp2-capacity",
        "ep2xtp2-sp-idle-rank", "ep2xtp2-relu2-groups"])
def test_parallel_layer_equals_one_process(world, tp, ep, sequence_parallel, options, bias):
    dp = world // tp
    reference = reference_layer(options, bias)
    expected = []
    for index in range(dp):  # one backward of the loss summed over every data-parallel rank's batch
        x, g = batch(index)
        x.requires_grad_()
        ctx = context()
        y = reference(x, ctx)
        (y * g).sum().backward()
        expected.append((y.detach(), x.grad, ctx.aux.pop()))
    reference_grads = {name: p.grad for name, p in reference.named_parameters()}

    results = run_distributed(parallel_forward_backward, world, tp, ep, sequence_parallel, options, bias)
    for rank, (y, x_grad, grads, raw_router_grad, metrics, all_to_alls) in enumerate(results):
        tp_rank, dp_rank = rank % tp, rank // tp
        y_ref, x_grad_ref, metrics_ref = expected[dp_rank]
        if sequence_parallel:
            y_ref, x_grad_ref = y_ref.chunk(tp, dim=1)[tp_rank], x_grad_ref.chunk(tp, dim=1)[tp_rank]
        assert_close(y, y_ref)
        assert_close(x_grad, x_grad_ref)
        ep_rank = dp_rank % ep
        owned = {str(e) for e in range(ep_rank * 4 // ep, (ep_rank + 1) * 4 // ep)}
        assert {name.split(".")[1] for name in grads if name.startswith("experts.")} == owned
        for name, grad in grads.items():
            assert_close(grad, reference_grads[name], msg=name)
        for name, value in metrics.items():
            assert value.item() == pytest.approx(metrics_ref[name].item(), rel=1e-5), name
        # forward: the counts, the tokens out and back; backward: the tokens' gradients back and out
        assert all_to_alls == ((3, 2) if ep > 1 else (0, 0))
        if not sequence_parallel:  # the router's gradient is whole, and the same, on every TP rank
            torch.testing.assert_close(raw_router_grad, results[rank - tp_rank][3], rtol=0, atol=0)
    # exactly the experts that no token picks have zero gradients (so do their ranks': they equal these)
    idle = [e for e, b in enumerate(bias) if b < max(bias)]
    for name, grad in reference_grads.items():
        assert grad.any() != (name.startswith("experts.") and int(name.split(".")[1]) in idle), name


@pytest.mark.parametrize("overrides, message", [
    (["model.moe.num_groups=3"], "model.moe.num_groups (3) must be positive and divide num_experts (8)"),
    (["model.moe.num_groups=4", "model.moe.top_k_groups=5"], "model.moe.top_k_groups (5) must be in [1, num_groups=4]"),
    (["model.moe.num_groups=8"], "its groups must hold top_k (2) experts (1 per group)"),
    (["model.moe.shared_ffn_hidden_size=64"], "model.moe.shared_ffn_hidden_size (64) needs model.moe.shared_experts >= 1"),
    (["model.moe.routed_scaling_factor=0"], "model.moe.routed_scaling_factor: must be > 0, got 0"),
])
def test_moe_options_the_layer_cannot_take_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.pattern=*E", *overrides])
    assert message in str(error.value)
