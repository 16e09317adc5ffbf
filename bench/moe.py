"""megamix's MoE layer against transformers' Mixtral MoE block and the compute floor; MoH against attention. CPU.

Forward + backward time, fp32, in one process. Prints one JSON object with two parts:

1. ``moe``: our ``MoE`` (pattern ``E``; hidden 512, 8 SwiGLU experts of ffn 1024, top-2, dropless, the
   model config's default routing: softmax scores renormalised over the top 2, Switch aux loss 0.01 and
   z-loss 0.001 attached) on ``[1, T, 512]`` for T in ``--tokens`` (2048 and 8192: one sequence, and a
   micro-batch of 4 × 2048), against
   - ``transformers``: ``transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock`` of the same shape
     (``MixtralConfig(hidden_size=512, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2)``),
     with the experts implementation that ``MixtralForCausalLM`` picks by default (``grouped_mm`` in 5.x:
     tokens sorted by expert, ``F.grouped_mm``) and, for reference, the per-expert loop (``eager``). Our
     weights are copied into it, so both route every token to the same experts (the JSON gives the largest
     output difference);
   - ``floor``: the compute floor, one dense SwiGLU ``GatedMLP(512, 1024)`` over top_k × T rows: the matmul
     FLOPs of the routed experts without routing, sorting, gathering or combining. The floor holds one
     expert's weights, the layer eight: per step the layer also stacks and writes back 8× the weights and
     weight gradients (48 MB against 6 MB here), a cost that does not shrink with T, so the ratio to the
     floor falls as T grows.
   ``megamix_over_floor`` and ``megamix_over_transformers`` are time ratios (< 1: megamix faster); the
   target is megamix within 10% of the floor. At this shape the experts' matmuls are 99.9% of the
   layer's matmul FLOPs (2·2·3·512·1024 per token against the router's 2·512·8), and they are ≈ 85%
   of the floor's time on the 2-core CPU (the rest is the SwiGLU's elementwise passes): the floor is
   an MoE layer whose routing, sorting, gathering and combining cost nothing.
2. ``moh``: ``MoHAttention`` (pattern ``H``; hidden 512, 8 heads × 64, 8 kv heads, rotary, 2 shared heads,
   routed top-2 or top-4 of the other 6: 50% or 75% of the heads active per token, MoH aux loss 0.01)
   against ``Attention`` (pattern ``*``, same shape) on ``[1, T, 512]``, T = 1024 and 2048, with the
   ratios MoH / attention and the path MoH's routed heads took (gathered query rows or one dense call,
   see ``megamix.nn.moh.GATHER_MAX_FRACTION``).

Each megamix layer is layer 0 of a one-layer ``HybridModel`` (its initialisation; the ctx is the model's
``forward_context``). Backward is ``out.backward(g)`` with a fixed random ``g`` (the gradient of
``(out · g).sum()``), into the input and all weights, whose gradients are reset to None between runs.
The systems of one comparison take turns run by run, the order rotating every round, so that load from
other processes hits all alike: ``--warmup`` untimed rounds, then timed rounds. A 1024² fp32 matmul probe
runs between consecutive runs; a timed run counts as quiet when the probes on both sides of it reach
``QUIET_FRACTION`` of the best probe of the benchmark, and rounds go on until every system has
``--repeats`` quiet runs (at most ``--max-rounds``, 3 × repeats by default). Time is the best (min) of the
quiet runs, the median beside it as a noise indicator; ratios are of the best times (``median_ratios``
beside them). ``--profile`` adds a ``torch.profiler`` breakdown of our MoE layer, of transformers' block and
of the floor (self CPU time per step by op and by category, profiler overhead included).

    python bench/moe.py [--repeats 10] [--warmup 2] [--tokens 2048,8192] [--lengths 1024,2048] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from megamix.parallel.context_parallel import SequenceLayout

HIDDEN = 512
MOE_FFN, NUM_EXPERTS, TOP_K = 1024, 8, 2
HEADS, KV_HEADS, HEAD_DIM, SHARED_HEADS = 8, 8, 64, 2
MOH_TOP_K = {"moh_50": 2, "moh_75": 4}  # routed heads per token: (2 + 2) / 8 and (2 + 4) / 8 active
QUIET_FRACTION = 0.7  # a timed run is quiet if the matmul probes around it reach this share of the best probe
FLOOR_TARGET = 1.10  # megamix MoE time ≤ 1.1 × the dense floor
VOCAB = 256  # the one-layer models' embedding and head are not measured

# torch.profiler op → category, for the --profile breakdown of the MoE layer
CATEGORIES = {
    "matmul (grouped_mm per expert; router)": ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm"),
    "token gather / scatter (dispatch, combine, their backward)": (
        "aten::index", "aten::_index_put_impl_", "aten::index_put_", "aten::index_add", "aten::index_add_",
        "aten::index_select", "aten::index_copy", "aten::index_copy_", "aten::scatter", "aten::new_zeros"),
    "routing, sort, balance losses": (
        "aten::_softmax", "aten::_softmax_backward_data", "aten::topk", "aten::sort", "aten::argsort",
        "aten::bincount", "aten::cumsum", "aten::gather", "aten::scatter_add_", "aten::scatter_add",
        "aten::logsumexp", "aten::div", "aten::floor_divide", "aten::remainder", "aten::max", "aten::mean",
        "aten::_to_copy", "aten::square", "aten::pow", "aten::exp", "aten::clamp", "aten::sub"),
    "SwiGLU + gating elementwise": ("aten::silu", "aten::silu_backward", "aten::mul", "aten::sum"),
    "expert weight stack + its backward": ("aten::cat", "aten::stack", "aten::unbind"),
    "gradient accumulation / copies / fills": (
        "aten::add_", "aten::add", "aten::copy_", "aten::fill_", "aten::zero_", "aten::zeros_like", "aten::clone"),
}


# ---------------------------------------------------------------------------------------------
# Systems: each builds its layer and returns run(), one forward + backward, and the tensors whose
# gradients to reset between runs.


def one_layer_model(pattern: str, overrides: list[str]):
    """A one-layer HybridModel (megamix's initialisation, buffers reset) and its layer-0 mixer."""
    from megamix.config import load_config
    from megamix.models import HybridModel

    base = [f"model.pattern={pattern}", f"model.hidden_size={HIDDEN}", f"model.num_heads={HEADS}",
            f"model.num_kv_heads={KV_HEADS}", f"model.head_dim={HEAD_DIM}", f"model.vocab_size={VOCAB}"]
    model = HybridModel(load_config(None, base + overrides).model).train()
    return model, model.layers["0"].mixer


def fwd_bwd(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor],
            after: Callable[[], None] = lambda: None) -> tuple[Callable[[], None], Callable[[], None]]:
    """(run, reset): run = forward + backward of a fixed random output gradient; reset = untimed cleanup."""
    with torch.no_grad():
        grad = torch.randn_like(forward())
    after()

    def run() -> None:
        forward().backward(grad)

    def reset() -> None:
        for t in leaves:
            t.grad = None
        after()
    return run, reset


def moe_systems(tokens: int, hf_eager: bool) -> tuple[dict, dict]:
    """megamix MoE, transformers' Mixtral block (default experts implementation and optionally eager), floor."""
    import transformers
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import (
        MixtralForCausalLM,
        MixtralSparseMoeBlock,
    )

    from megamix.nn.init import init_parameters
    from megamix.nn.mlp import GatedMLP

    transformers.logging.set_verbosity_error()
    model, moe = one_layer_model("E", [f"model.moe.ffn_hidden_size={MOE_FFN}", f"model.moe.num_experts={NUM_EXPERTS}",
                                       f"model.moe.top_k={TOP_K}"])
    ctx = model.forward_context(SequenceLayout(tokens), torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.randn(1, tokens, HIDDEN, requires_grad=True)
    systems = {"megamix": fwd_bwd(lambda: moe(x, ctx), [x, *moe.parameters()], model.aux.pop)}

    def hf_config(**kwargs) -> MixtralConfig:
        return MixtralConfig(hidden_size=HIDDEN, intermediate_size=MOE_FFN, num_local_experts=NUM_EXPERTS,
                             num_experts_per_tok=TOP_K, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             num_hidden_layers=1, vocab_size=VOCAB, **kwargs)
    # the experts implementation a Mixtral model gets by default (the block alone would take the eager loop)
    default_impl = MixtralForCausalLM(hf_config()).config._experts_implementation
    impls = {"transformers": default_impl, **({"transformers_eager": "eager"} if hf_eager else {})}
    diffs = {}
    for name, impl in impls.items():
        block = MixtralSparseMoeBlock(hf_config(experts_implementation=impl)).train()
        with torch.no_grad():  # our weights: the same routing, the same outputs
            block.gate.weight.copy_(moe.router.weight)
            block.experts.gate_up_proj.copy_(torch.stack([e.gate_up_proj.weight for e in moe.experts.values()]))
            block.experts.down_proj.copy_(torch.stack([e.down_proj.weight for e in moe.experts.values()]))
            diffs[name] = float((block(x) - moe(x, ctx)).abs().max())
        model.aux.pop()
        systems[name] = fwd_bwd(lambda block=block: block(x), [x, *block.parameters()])

    floor = GatedMLP(HIDDEN, MOE_FFN).train()
    init_parameters(floor, 0, 0.02, 1)
    x_floor = torch.randn(1, TOP_K * tokens, HIDDEN, requires_grad=True)
    systems["floor"] = fwd_bwd(lambda: floor(x_floor, None), [x_floor, *floor.parameters()])
    with torch.no_grad():
        load = torch.bincount(moe.router(x).topk(TOP_K, dim=-1).indices.flatten(), minlength=NUM_EXPERTS)
    info = {"transformers_experts_implementation": impls, "max_abs_output_diff_vs_megamix": diffs,
            "rows_per_expert": load.tolist(), "megamix_aux_loss_coeff": moe.aux_loss_coeff,
            "megamix_z_loss_coeff": moe.z_loss_coeff}
    return systems, info


def moh_systems(seq: int) -> tuple[dict, dict]:
    """Attention and MoH at 50% / 75% active heads on [1, seq, hidden]."""
    from megamix.nn.moh import GATHER_MAX_FRACTION

    torch.manual_seed(0)
    x = torch.randn(1, seq, HIDDEN, requires_grad=True)
    systems, info = {}, {}
    for name, top_k in {"attention": None, **MOH_TOP_K}.items():
        overrides = ([] if top_k is None else
                     [f"model.moh.shared_heads={SHARED_HEADS}", f"model.moh.routed_top_k={top_k}"])
        model, mixer = one_layer_model("*" if top_k is None else "H", overrides)
        ctx = model.forward_context(SequenceLayout(seq), torch.device("cpu"))
        systems[name] = fwd_bwd(lambda mixer=mixer, ctx=ctx: mixer(x, ctx), [x, *mixer.parameters()], model.aux.pop)
        if top_k is not None:
            with torch.no_grad():
                gates, _ = mixer.route(x)
                busiest = float((mixer.by_role(gates)[1] > 0).sum(dim=1).max()) / seq
            info[name] = {"active_heads": (SHARED_HEADS + top_k) / HEADS, "busiest_routed_head_rows": round(busiest, 3),
                          "routed_path": "gathered rows" if busiest <= GATHER_MAX_FRACTION else "dense"}
    return systems, info


# ---------------------------------------------------------------------------------------------
# Timing


REFERENCE_GFLOPS = 0.0  # the best probe so far


def gemm_probe() -> float:
    """GFLOP/s of the best of three fp32 1024² matmuls (≈ 10 ms each on 2 quiet cores): it drops when other
    processes share the CPU (torch's thread pool then also stalls in every parallel region)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e9


def time_alternating(systems: dict[str, tuple[Callable, Callable]], warmup: int, repeats: int,
                     max_rounds: int) -> dict[str, dict]:
    """Every system once per round, the order rotating each round, a matmul probe between runs.

    A timed run is quiet when the probes before and after it reach ``QUIET_FRACTION`` of the best probe of
    the whole benchmark (``REFERENCE_GFLOPS``); rounds go on until every system has ``repeats`` quiet runs
    (at most ``max_rounds`` timed rounds).
    Best and median ms over the quiet runs (over all runs, marked ``disturbed``, if fewer than
    ``min(3, repeats)`` were quiet).
    """
    global REFERENCE_GFLOPS
    names = list(systems)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}  # (seconds, probe GFLOP/s)

    def quiet(name: str) -> list[float]:
        return [t for t, g in runs[name] if g >= QUIET_FRACTION * REFERENCE_GFLOPS]

    probe = gemm_probe()
    for i in range(warmup + max_rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            run, reset = systems[name]
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            reset()
            before, probe = probe, gemm_probe()
            REFERENCE_GFLOPS = max(REFERENCE_GFLOPS, probe)
            if i >= warmup:
                runs[name].append((elapsed, min(before, probe)))
        if i >= warmup and all(len(quiet(name)) >= repeats for name in names):
            break
    out = {}
    for name in names:
        times = quiet(name)
        disturbed = len(times) < min(3, repeats)
        times = times if not disturbed else [t for t, _ in runs[name]]
        out[name] = {"best_ms": round(1e3 * min(times), 2), "median_ms": round(1e3 * statistics.median(times), 2),
                     "quiet_runs": len(quiet(name)), "runs": len(runs[name]),
                     **({"disturbed": True} if disturbed else {})}
    return out


def profile(systems: dict[str, tuple[Callable, Callable]], names: list[str], steps: int) -> dict:
    """Self CPU time per step (ms) of each system's ops (the top ones) and by category."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = {}
    for name in names:
        run, reset = systems[name]
        run()
        reset()
        for _ in range(3):  # until the probes around the profiled steps say quiet, at most 3 tries
            before = gemm_probe()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    run()
                    reset()
            probe = min(before, gemm_probe())
            if probe >= QUIET_FRACTION * REFERENCE_GFLOPS:
                break
        per_op = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
        total = sum(per_op.values())
        categories = {category: round(sum(per_op.get(op, 0.0) for op in ops), 1)
                      for category, ops in CATEGORIES.items()}
        categories["other"] = round(total - sum(categories.values()), 1)
        top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
        out[name] = {"total_ms": round(total, 1), "quiet": probe >= QUIET_FRACTION * REFERENCE_GFLOPS,
                     "by_category_ms": categories,
                     "top_ops_ms": {op: round(ms, 2) for op, ms in top}}
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed forward+backward runs per system (best of)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per system first")
    parser.add_argument("--max-rounds", type=int, default=0,
                        help="timed rounds at most while waiting for quiet runs (0: 3 × repeats)")
    parser.add_argument("--tokens", default="2048,8192", help="MoE inputs [1, tokens, 512], comma-separated")
    parser.add_argument("--lengths", default="1024,2048", help="MoH vs attention sequence lengths")
    parser.add_argument("--no-transformers-eager", action="store_true",
                        help="skip transformers' per-expert loop (eager) Mixtral experts")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown of the MoE systems")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--parts", default="moe,moh", help="which parts to run")
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 MoE tokens, T = 512, 2 timed runs")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.lengths, args.repeats, args.warmup, args.profile_steps = "512", "512", 2, 1, 1
    args.max_rounds = args.max_rounds or 3 * args.repeats
    parts = set(args.parts.split(","))
    start = time.perf_counter()
    global REFERENCE_GFLOPS
    REFERENCE_GFLOPS = max(gemm_probe() for _ in range(20))  # ≈ 1 s: the best the CPU gives right now

    import transformers

    result: dict = {
        "benchmark": "moe",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads(), "loadavg_1min_at_start": round(os.getloadavg()[0], 2)},
        "settings": {"dtype": "fp32", "warmup": args.warmup, "repeats": args.repeats,
                     "time": "best (min) of the quiet timed forward+backward runs, ms; median beside it; systems "
                             "alternate run by run, the order rotating every round",
                     "quiet_run": f"the fp32 1024^2 matmul probes before and after the run reach {QUIET_FRACTION} of "
                                  "the best probe of the benchmark; rounds continue (up to max_rounds) until every "
                                  "system has `repeats` quiet runs",
                     "max_rounds": args.max_rounds,
                     "backward": "out.backward(fixed random gradient) into the input and all weights (grads reset)"},
    }
    for tokens in (int(t) for t in args.tokens.split(",")) if "moe" in parts else ():
        systems, info = moe_systems(tokens, not args.no_transformers_eager)
        times = time_alternating(systems, args.warmup, args.repeats, args.max_rounds)
        best = {name: t["best_ms"] for name, t in times.items()}
        result.setdefault("moe", {})[str(tokens)] = moe = {
            "shape": {"tokens": tokens, "hidden": HIDDEN, "expert_ffn": MOE_FFN, "experts": NUM_EXPERTS,
                      "top_k": TOP_K, "floor_rows": TOP_K * tokens, "dropless": True},
            **info, "times": times,
            "megamix_over_floor": round(best["megamix"] / best["floor"], 3),
            "megamix_over_transformers": round(best["megamix"] / best["transformers"], 3),
            **({"megamix_over_transformers_eager": round(best["megamix"] / best["transformers_eager"], 3)}
               if "transformers_eager" in best else {}),
            "median_ratios": {f"megamix_over_{peer}": round(
                times["megamix"]["median_ms"] / times[peer]["median_ms"], 3) for peer in ("floor", "transformers")},
            "target": f"megamix_over_floor <= {FLOOR_TARGET}",
            "target_met": best["megamix"] <= FLOOR_TARGET * best["floor"],
        }
        if args.profile:
            moe["profile"] = profile(systems, ["megamix", "transformers", "floor"], args.profile_steps)
        del systems
    if "moh" in parts:
        moh: dict = {"shape": {"hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                               "shared_heads": SHARED_HEADS, "routed_top_k": MOH_TOP_K, "batch": 1}}
        for seq in (int(t) for t in args.lengths.split(",")):
            systems, info = moh_systems(seq)
            times = time_alternating(systems, args.warmup, args.repeats, args.max_rounds)
            moh[str(seq)] = {"times": times, **{f"{name}_over_attention": round(
                times[name]["best_ms"] / times["attention"]["best_ms"], 3) for name in MOH_TOP_K}, "routing": info}
            del systems
        result["moh"] = moh
    result["machine"]["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["machine"]["gemm_probe_best_gflops"] = round(REFERENCE_GFLOPS, 1)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
