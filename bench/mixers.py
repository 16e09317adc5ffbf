"""Lightning attention (``L``) and Mamba-2 (``M``) against softmax attention and transformers' Mamba2, on CPU.

Forward + backward time and peak memory, fp32, batch 1, at growing sequence lengths T.
Prints one JSON object.

1. Op level (the targets for ``L``): megamix's chunked linear-attention op
   ``megamix_kernels.linear_attention.linear_attention``
   - Lightning: constant log-decay per head, q, k, v ``[1, T, 8, 64]``;
   - Mamba-2 SSD: per-token log-decay ``[1, T, 16]``, C, B ``[1, T, 1, 64]`` (one group, state 64),
     Δ·x ``[1, T, 16, 64]``;
   against causal ``F.scaled_dot_product_attention`` on q, k, v ``[1, 8, T, 64]`` (``is_causal=True``).
   Softmax attention is skipped above ``--max-softmax-len`` (16K): its time grows 4× per 2× length.
2. Layer level (for transparency): the ``L`` mixer (hidden 512, 8 heads × 64), the ``M`` mixer
   (hidden 512, 16 heads × 64, state 64, 1 group: expand 2) and the attention mixer (hidden 512,
   8 heads × 64, 8 kv heads, rotary), input ``[1, T, 512]``.
3. megamix's ``M`` mixer against ``transformers.models.mamba2.modeling_mamba2.Mamba2Mixer`` of the
   same shape, in training mode. Without ``mamba_ssm`` / ``causal_conv1d`` (never on CPU) it runs
   its PyTorch reference path (chunked SSD with transformers' default ``chunk_size``).

Every case runs in a fresh subprocess: build the inputs (all leaves ``requires_grad``) or the layer and
a fixed random output gradient, then time forward + ``backward(grad)``, gradients set to None between
runs. Time: the best timed run after ``--warmup`` untimed ones, with the median of the quiet runs beside
it. Each run sits between two matmul probes; it is quiet when both reach QUIET_FRACTION of the best
probe of the benchmark (or ``--quiet-gflops``), and a case retries until it has ``--repeats`` quiet runs
(fast cases: until they add up to ``--min-time``), else it is marked ``disturbed``. On 2 cores a
second busy process slows the many small ops of the chunked kernels 10-30x but a matmul only ~3x.
Peak memory: the same code first runs at T = 256 (so that library pages and thread pools are
resident), the free heap is trimmed, then the first forward + backward at T is measured as the peak
resident set size (VmHWM, reset through ``/proc/self/clear_refs`` right before it) minus the resident
size before it: what forward + backward adds on top of the inputs and weights.
Ratios (peer time / megamix time) and growth factors (time at 4T / time at T) come from the same run;
the cases compared at one length run one after another.

Targets (issue 6): ``L`` op ≥ 20× faster than causal SDPA at T = 16K, its time growing ≤ 4.4× per
4× length; ``M`` mixer ≥ 1.8× faster than transformers' Mamba2 mixer at T = 4K.

    python bench/mixers.py [--lengths 1024,4096,16384,32768] [--repeats 3] [--rounds 1] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

BATCH = 1
HIDDEN = 512
L_HEADS, L_HEAD_DIM = 8, 64  # Lightning / softmax attention: 8 heads × 64
M_HEADS, M_HEAD_DIM, M_STATE, M_GROUPS, M_CONV = 16, 64, 64, 1, 4  # Mamba-2: d_inner 1024 = expand 2
TARGETS = {"lightning_vs_sdpa_at": 16384, "lightning_vs_sdpa_min": 20.0, "lightning_growth_max": 4.4,
           "mamba2_vs_transformers_at": 4096, "mamba2_vs_transformers_min": 1.8}


# ---------------------------------------------------------------------------------------------
# Cases: each builds its inputs and returns (run, leaves); run() does one forward + backward.


def _fwd_bwd(forward: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        forward().backward(grad)
    return run


def _random_grad(forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.randn_like(forward())


def op_sdpa(seq: int, layout: str):
    """Causal softmax attention, q, k, v ``[1, 8, T, 64]`` (``bshd``: views of ``[1, T, 8, 64]`` memory)."""
    def make():
        if layout == "bshd":
            return torch.randn(BATCH, seq, L_HEADS, L_HEAD_DIM).transpose(1, 2).requires_grad_()
        return torch.randn(BATCH, L_HEADS, seq, L_HEAD_DIM, requires_grad=True)
    q, k, v = make(), make(), make()
    forward = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return _fwd_bwd(forward, _random_grad(forward)), [q, k, v]


def op_lightning(seq: int, layout: str):
    """Linear attention with a constant decay per head (the ALiBi-slope schedule), q, k, v ``[1, T, 8, 64]``."""
    from megamix_kernels.linear_attention import linear_attention

    from megamix.nn.lightning import lightning_log_decay

    q, k, v = (torch.randn(BATCH, seq, L_HEADS, L_HEAD_DIM, requires_grad=True) for _ in range(3))
    log_decay = torch.tensor(lightning_log_decay("alibi", L_HEADS, 0, 1))
    forward = lambda: linear_attention(q, k, v, log_decay)[0]
    return _fwd_bwd(forward, _random_grad(forward)), [q, k, v]


def op_ssd(seq: int, layout: str):
    """Mamba-2 SSD as linear attention: q = C, k = B ``[1, T, 1, 64]``, v = Δ·x ``[1, T, 16, 64]``,
    per-token log-decay Δ·A ``[1, T, 16]`` (learned, so it gets a gradient too)."""
    from megamix_kernels.linear_attention import linear_attention

    c, b = (torch.randn(BATCH, seq, M_GROUPS, M_STATE, requires_grad=True) for _ in range(2))
    x = torch.randn(BATCH, seq, M_HEADS, M_HEAD_DIM, requires_grad=True)
    log_decay = (-0.5 * torch.rand(BATCH, seq, M_HEADS) - 1e-3).requires_grad_()
    forward = lambda: linear_attention(c, b, x, log_decay)[0]
    return _fwd_bwd(forward, _random_grad(forward)), [c, b, x, log_decay]


def _megamix_mixer(pattern: str, seq: int):
    """Layer 0's mixer of a one-layer HybridModel (tiny vocabulary: the embedding is not measured)."""
    from megamix.config import load_config
    from megamix.models import HybridModel
    from megamix.parallel.context_parallel import SequenceLayout

    overrides = [f"model.pattern={pattern}", f"model.hidden_size={HIDDEN}", f"model.num_heads={L_HEADS}",
                 f"model.num_kv_heads={L_HEADS}", f"model.head_dim={L_HEAD_DIM}", "model.vocab_size=256",
                 f"model.mamba.num_heads={M_HEADS}", f"model.mamba.head_dim={M_HEAD_DIM}",
                 f"model.mamba.state_size={M_STATE}", f"model.mamba.num_groups={M_GROUPS}",
                 f"model.mamba.conv_kernel={M_CONV}"]
    model = HybridModel(load_config(None, overrides).model).train()
    return model.layers["0"].mixer, model.forward_context(SequenceLayout(seq), torch.device("cpu"))


def _layer(mixer: torch.nn.Module, seq: int, call: Callable[[torch.Tensor], torch.Tensor]):
    x = torch.randn(BATCH, seq, HIDDEN, requires_grad=True)
    forward = lambda: call(x)
    return _fwd_bwd(forward, _random_grad(forward)), [x, *mixer.parameters()]


def layer_mixer(pattern: str):
    def build(seq: int, layout: str):
        mixer, ctx = _megamix_mixer(pattern, seq)
        return _layer(mixer, seq, lambda x: mixer(x, ctx))
    return build


def transformers_mamba2_config():
    from transformers import Mamba2Config

    return Mamba2Config(hidden_size=HIDDEN, num_heads=M_HEADS, head_dim=M_HEAD_DIM, state_size=M_STATE,
                        expand=M_HEADS * M_HEAD_DIM // HIDDEN, n_groups=M_GROUPS, conv_kernel=M_CONV,
                        num_hidden_layers=1, vocab_size=256)


def layer_transformers_mamba2(seq: int, layout: str):
    """transformers' Mamba2Mixer in training mode without a cache: on CPU its PyTorch path."""
    import transformers
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    transformers.logging.set_verbosity_error()  # the "falling back to the PyTorch implementation" notices
    torch.manual_seed(0)
    mixer = Mamba2Mixer(transformers_mamba2_config(), layer_idx=0).train()
    return _layer(mixer, seq, mixer)


CASES: dict[str, Callable] = {
    "op/sdpa": op_sdpa, "op/lightning": op_lightning, "op/ssd": op_ssd,
    "layer/attention": layer_mixer("*"), "layer/lightning": layer_mixer("L"), "layer/mamba2": layer_mixer("M"),
    "transformers/mamba2": layer_transformers_mamba2,
}
SOFTMAX = {"op/sdpa", "layer/attention"}
QUIET_FRACTION = 0.7  # a timed run counts as quiet if the matmul probes around it reach this share of the best
WARM_LEN = 256  # length of the untimed, unmeasured run of each case's code before the case itself
MEMORY_METHOD = ("fresh process per case: peak RSS (VmHWM, reset via /proc/self/clear_refs) during its first "
                 "forward+backward minus RSS before it")
FALLBACK_MEMORY_METHOD = ("fresh process per case: ru_maxrss after its first forward+backward minus ru_maxrss before "
                          "it (a lower bound where building the case peaked higher)")


# ---------------------------------------------------------------------------------------------
# One case in this (fresh) process.


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, ru_maxrss) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    gc.collect()
    try:  # hand glibc's free heap pages back, so the RSS before the measured run holds no reusable slack
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def gemm_gflops(seconds: float = 1.0) -> dict[str, float]:
    """fp32 1024² matmul throughput, best and median over ``seconds``: how loaded the CPU is right now."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    times: list[float] = []
    while sum(times) < seconds:
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return {"best": round(2 * 1024**3 / min(times) / 1e9, 1), "median": round(2 * 1024**3 / statistics.median(times) / 1e9, 1)}


_PROBE = None


def gemm_probe() -> float:
    """GFLOP/s of three fp32 1024² matmuls (≈ 20 ms on 2 cores): drops when other work shares the CPU."""
    global _PROBE
    if _PROBE is None:
        _PROBE = torch.randn(1024, 1024), torch.randn(1024, 1024)
        _PROBE[0] @ _PROBE[1]
    a, b = _PROBE
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def run_case(name: str, seq: int, args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # The same code at a short length first: the library code pages it touches, the thread pool and
    # one-time caches would otherwise count as this case's memory.
    warm_run, warm_leaves = CASES[name](min(seq, WARM_LEN), args.sdpa_layout)
    for _ in range(2):
        warm_run()
    del warm_run, warm_leaves
    _release_free_memory()

    run, leaves = CASES[name](seq, args.sdpa_layout)

    def clear_grads():
        for t in leaves:
            t.grad = None

    _release_free_memory()
    if _reset_peak_rss() and _proc_status_kb("VmHWM") is not None:
        method, before = MEMORY_METHOD, _proc_status_kb("VmRSS")
        run()
        peak = _proc_status_kb("VmHWM") - before
    else:
        method, before = FALLBACK_MEMORY_METHOD, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    clear_grads()
    for _ in range(args.warmup - 1):  # the measured run above was the first warm-up
        run()
        clear_grads()
    # Timed runs, each between two probes of the CPU's matmul throughput: outside load that slows the
    # probes marks the run as disturbed (a run of many small ops can slow down far more than the probe).
    runs: list[tuple[float, float]] = []  # (seconds, slower probe's GFLOP/s)
    reference = args.gemm_ref
    start_all = time.perf_counter()

    def quiet() -> list[float]:
        return [t for t, gflops in runs if gflops >= QUIET_FRACTION * reference]

    while len(runs) < args.max_repeats:
        before_probe = gemm_probe()
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        runs.append((elapsed, min(before_probe, gemm_probe())))
        clear_grads()
        reference = max(reference, *(g for _, g in runs))
        enough = len(quiet()) >= args.repeats and sum(quiet()) >= args.min_time
        if enough or (len(runs) >= args.repeats and time.perf_counter() - start_all > args.case_budget):
            break
    return {"times": [t for t, _ in runs], "probes": [round(g, 1) for _, g in runs], "gemm_ref": reference,
            "peak_mb": round(peak / 1024, 1), "memory_method": method, "threads": torch.get_num_threads()}


def measure(name: str, seq: int, args: argparse.Namespace) -> dict:
    """Run one case in a fresh interpreter: its peak memory is then its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{name}@{seq}", "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--min-time", str(args.min_time), "--max-repeats", str(args.max_repeats),
           "--case-budget", str(args.case_budget), "--sdpa-layout", args.sdpa_layout, "--threads", str(args.threads),
           "--quiet-gflops", str(args.gemm_ref)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.case_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} at T={seq} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    args.gemm_ref = max(args.gemm_ref, result["gemm_ref"])  # the least loaded probe so far sets the bar
    times = result["times"]
    quiet = [t for t, g in zip(times, result["probes"]) if g >= QUIET_FRACTION * args.gemm_ref]
    print(f"{name:20s} T={seq:6d}  best {min(times):.4f} s  median {statistics.median(times):.4f} s  "
          f"quiet {len(quiet)}/{len(times)}  peak {result['peak_mb']:.0f} MB  ({time.perf_counter() - start:.0f} s)",
          file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# The whole benchmark.


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model} ({', '.join(isa)})" if isa else model


def growth(times: dict[int, float]) -> dict[str, float]:
    """time(4T) / time(T) for every measured pair of lengths 4× apart."""
    return {f"{t}->{4 * t}": round(times[4 * t] / times[t], 2) for t in sorted(times) if 4 * t in times}


def best_times(results: dict[str, dict]) -> dict[int, float]:
    return {int(t): r["time_s"] for t, r in results.items() if "time_s" in r}


def compare(peer: dict[str, dict], ours: dict[str, dict]) -> dict[str, float]:
    """peer time / our time at every length both measured (> 1: ours is faster)."""
    return {t: round(peer[t]["time_s"] / ours[t]["time_s"], 2) for t in ours if "time_s" in peer.get(t, {})}


Raw = dict[tuple[str, int], list[dict]]  # (case, T) → the subprocess results of its rounds


def run_group(names: list[str], lengths: list[int], args: argparse.Namespace, raw: Raw) -> None:
    """Every case at every length, ``--rounds`` times, into ``raw``. The cases of one length run one
    after another, in alternating order from round to round, so that outside load drifting during the
    run hits the compared cases alike."""
    for r in range(args.rounds):
        for seq in lengths:
            for name in names[:: -1 if r % 2 else 1]:
                if not (name in SOFTMAX and seq > args.max_softmax_len):
                    raw.setdefault((name, seq), []).append(measure(name, seq, args))


def summarise(name: str, lengths: list[int], args: argparse.Namespace, raw: Raw) -> dict[str, dict]:
    """Per length: the best run over all rounds (outside load only ever slows a run down), the median
    of the quiet runs (those whose probes reached QUIET_FRACTION of the best probe of the whole
    benchmark), and ``disturbed`` where fewer than ``--repeats`` runs were quiet."""
    out: dict[str, dict] = {}
    for seq in lengths:
        if (name, seq) not in raw:
            out[str(seq)] = {"skipped": f"softmax attention is skipped above T={args.max_softmax_len} "
                                        "(quadratic: about 4x the time per 2x length)"}
            continue
        times = [t for result in raw[name, seq] for t in result["times"]]
        probes = [g for result in raw[name, seq] for g in result["probes"]]
        quiet = [t for t, g in zip(times, probes) if g >= QUIET_FRACTION * args.gemm_ref]
        out[str(seq)] = {"time_s": round(min(times), 4), "median_s": round(statistics.median(quiet or times), 4),
                         "runs": len(times), "quiet_runs": len(quiet),
                         "peak_mb": max(result["peak_mb"] for result in raw[name, seq])}
        if len(quiet) < min(args.repeats, len(times)):
            out[str(seq)]["disturbed"] = True  # too few runs had the CPU to themselves: rerun
    return out


def target(value: float | None, bound: float, at_least: bool) -> dict:
    met = None if value is None else (value >= bound if at_least else value <= bound)
    return {"value": value, "target": f"{'>=' if at_least else '<='} {bound}", "met": met}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384,32768",
                        help="comma-separated sequence lengths for the op and layer levels")
    parser.add_argument("--transformers-lengths", default="1024,4096", help="lengths of the M vs transformers case")
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed runs per case (best of)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (the first also gives the memory)")
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="keep timing a case until its timed runs add up to this many seconds ...")
    parser.add_argument("--max-repeats", type=int, default=20, help="... or it has run this many times")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every case this many times, each in a fresh process (best over all rounds)")
    parser.add_argument("--case-budget", type=float, default=60,
                        help="stop retrying disturbed runs of a case after this many seconds")
    parser.add_argument("--quiet-gflops", dest="gemm_ref", type=float, default=0.0,
                        help="matmul-probe GFLOP/s of this CPU when quiet (0: the best probe of the run)")
    parser.add_argument("--max-softmax-len", type=int, default=16384, help="skip softmax attention above this T")
    parser.add_argument("--sdpa-layout", choices=["bshd", "bhsd"], default="bshd",
                        help="memory of the op-level SDPA inputs [1, 8, T, 64]: views of [1, T, 8, 64] (bshd, "
                             "what megamix's attention passes and the faster one for the CPU kernel) or contiguous")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--levels", default="op,layer,transformers", help="which parts to run")
    parser.add_argument("--quick", action="store_true", help="smoke run: T = 256, 1024; 2 timed runs")
    parser.add_argument("--case-timeout", type=float, default=1800, help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: NAME@T, run one case in this process
    args = parser.parse_args()

    if args.case:
        name, seq = args.case.rsplit("@", 1)
        print(json.dumps(run_case(name, int(seq), args)))
        return
    if args.quick:
        args.lengths, args.transformers_lengths, args.repeats, args.min_time = "256,1024", "1024", 2, 0.0
    lengths = sorted(int(t) for t in args.lengths.split(","))
    hf_lengths = sorted(int(t) for t in args.transformers_lengths.split(","))
    levels = set(args.levels.split(","))
    start = time.perf_counter()

    import transformers

    gemm_start = gemm_gflops()
    args.gemm_ref = max(args.gemm_ref, gemm_start["best"])
    result: dict = {
        "benchmark": "mixers",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "torch_threads": args.threads or torch.get_num_threads()},
        "settings": {
            "dtype": "fp32", "batch": BATCH, "lengths": lengths, "rounds": args.rounds, "repeats_min": args.repeats,
            "warmup": args.warmup, "min_time_s": args.min_time, "max_repeats": args.max_repeats,
            "time": "best timed forward+backward run after warm-up over all rounds, seconds; median of its "
                    "quiet runs beside it",
            "quiet_run": f"both 3x1024^2 fp32 matmul probes around the run reach {QUIET_FRACTION} of the best probe "
                         "of the whole benchmark (machine.gemm_gflops.quiet_reference); a case retries until it "
                         "has repeats_min quiet runs (or its time budget is spent) and is marked disturbed if not",
            "memory_mb": MEMORY_METHOD if _reset_peak_rss() else FALLBACK_MEMORY_METHOD,
            "backward": "out.backward(fixed random gradient); gradients of inputs and weights",
        },
    }

    raw: Raw = {}
    groups = {"op": (["op/sdpa", "op/lightning", "op/ssd"], lengths),
              "layer": (["layer/attention", "layer/lightning", "layer/mamba2"], lengths),
              "transformers": (["layer/mamba2", "transformers/mamba2"], hf_lengths)}
    hf_raw: Raw = {}  # its own megamix runs, measured next to transformers'
    for level, (names, level_lengths) in groups.items():
        if level in levels:
            run_group(names, level_lengths, args, hf_raw if level == "transformers" else raw)

    if "op" in levels:
        sdpa, light, ssd = (summarise(n, lengths, args, raw) for n in ("op/sdpa", "op/lightning", "op/ssd"))
        result["op"] = {
            "shapes": {
                "sdpa": f"F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v [1, {L_HEADS}, T, "
                        f"{L_HEAD_DIM}] ({args.sdpa_layout} memory)",
                "lightning": f"linear_attention(q, k, v, log_decay [{L_HEADS}]), q, k, v [1, T, {L_HEADS}, "
                             f"{L_HEAD_DIM}]",
                "ssd": f"linear_attention(C, B, dt*x, log_decay [1, T, {M_HEADS}]), C, B [1, T, {M_GROUPS}, "
                       f"{M_STATE}], dt*x [1, T, {M_HEADS}, {M_HEAD_DIM}]",
            },
            "sdpa": sdpa, "lightning": light, "ssd": ssd,
            "speedup_lightning_vs_sdpa": compare(sdpa, light),
            "speedup_ssd_vs_sdpa": compare(sdpa, ssd),
            "growth_per_4x": {"sdpa": growth(best_times(sdpa)), "lightning": growth(best_times(light)),
                              "ssd": growth(best_times(ssd))},
        }
    if "layer" in levels:
        attn, light, mamba = (summarise(n, lengths, args, raw)
                              for n in ("layer/attention", "layer/lightning", "layer/mamba2"))
        result["layer"] = {
            "shapes": {"attention": f"Attention(hidden {HIDDEN}, {L_HEADS} heads x {L_HEAD_DIM}, {L_HEADS} kv heads, "
                                    "rotary)",
                       "lightning": f"LightningAttention(hidden {HIDDEN}, {L_HEADS} heads x {L_HEAD_DIM})",
                       "mamba2": f"Mamba2Mixer(hidden {HIDDEN}, {M_HEADS} heads x {M_HEAD_DIM}, state {M_STATE}, "
                                 f"{M_GROUPS} group, conv {M_CONV})",
                       "input": f"[1, T, {HIDDEN}]"},
            "attention": attn, "lightning": light, "mamba2": mamba,
            "speedup_lightning_vs_attention": compare(attn, light),
            "speedup_mamba2_vs_attention": compare(attn, mamba),
            "growth_per_4x": {"attention": growth(best_times(attn)), "lightning": growth(best_times(light)),
                              "mamba2": growth(best_times(mamba))},
        }
    if "transformers" in levels:
        import importlib.util

        ours, theirs = (summarise(n, hf_lengths, args, hf_raw) for n in ("layer/mamba2", "transformers/mamba2"))
        fused = {p: importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d", "kernels")}
        result["mamba2_vs_transformers"] = {
            "shape": {"hidden": HIDDEN, "heads": M_HEADS, "head_dim": M_HEAD_DIM, "state": M_STATE,
                      "groups": M_GROUPS, "conv": M_CONV, "input": f"[1, T, {HIDDEN}]"},
            "transformers_chunk_size": transformers_mamba2_config().chunk_size,
            "transformers_path": ("PyTorch reference path (torch conv1d + chunked SSD einsums)" if not any(fused.values())
                                  else f"fused packages importable: {fused}"),
            "megamix": ours, "transformers": theirs,
            "speedup_megamix_vs_transformers": compare(theirs, ours),
        }

    at, hf_at = str(TARGETS["lightning_vs_sdpa_at"]), str(TARGETS["mamba2_vs_transformers_at"])
    light_growth = result.get("op", {}).get("growth_per_4x", {}).get("lightning", {})
    result["targets"] = {
        f"lightning_op_speedup_vs_sdpa_at_{at}": target(
            result.get("op", {}).get("speedup_lightning_vs_sdpa", {}).get(at), TARGETS["lightning_vs_sdpa_min"], True),
        "lightning_op_max_growth_per_4x": target(
            max(light_growth.values()) if light_growth else None, TARGETS["lightning_growth_max"], False),
        f"mamba2_speedup_vs_transformers_at_{hf_at}": target(
            result.get("mamba2_vs_transformers", {}).get("speedup_megamix_vs_transformers", {}).get(hf_at),
            TARGETS["mamba2_vs_transformers_min"], True),
    }
    result["disturbed_cases"] = [f"{section}/{case}@{seq}" for section in ("op", "layer", "mamba2_vs_transformers")
                                 for case, per_len in result.get(section, {}).items() if isinstance(per_len, dict)
                                 for seq, r in per_len.items() if isinstance(r, dict) and r.get("disturbed")]
    result["machine"]["gemm_gflops"] = {"start": gemm_start, "end": gemm_gflops(),  # drop under outside load
                                        "quiet_reference": round(args.gemm_ref, 1)}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
