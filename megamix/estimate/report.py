"""Readable text of an estimate and of a layout search."""

from __future__ import annotations

from megamix.models.hybrid import LAYER_KINDS
from megamix.estimate.plan import Estimate
from megamix.estimate.hardware import GiB


def _gib(n: float) -> str:
    """Bytes in GiB, or MiB below 1 GiB."""
    return f"{n / GiB:7.2f} GiB" if n >= GiB else f"{n / 2**20:7.1f} MiB"


def _memory_lines(e: Estimate) -> list[str]:
    budget = e.device.memory_per_rank(e.cluster.procs_per_node)
    sharding = (f"ZeRO-1 over dp×cp = {e.layout.grad_group}" if e.layout.zero and e.layout.grad_group > 1
                else "replicated")
    lines = []
    for m in e.memory:
        peak_rank = " (peak rank)" if m is e.peak and len(e.memory) > 1 else ""
        casts = f"   bf16 casts {_gib(m.casts)}" if m.casts else ""
        recompute = (f" (recompute: layer inputs) + {_gib(m.recomputed).strip()} recomputed"
                     if e.layout.recompute else "")
        kinds = ", ".join(f"'{k}' {_gib(v).strip()}" for k, v in m.activations_by_kind.items())
        outputs = (f"   pipeline outputs {_gib(m.outputs)} (logits of every micro-batch, kept by the schedule)"
                   if m.outputs else "")
        lines += [f"  pipeline rank {m.rank}: {m.parameters:,} parameters{peak_rank}",
                  f"    weights     {_gib(m.weights)}   grads {_gib(m.grads)}{casts}",
                  f"    optimizer   {_gib(m.optimizer)}   (AdamW moments, {sharding})",
                  (f"    activations {_gib(m.activations)}   = {m.in_flight:g} micro-batch(es) in flight × "
                   f"{_gib(m.per_micro_batch).strip()}{recompute}"),
                  f"      per micro-batch by layer kind: {kinds} (without recompute), embedding and head the rest",
                  f"    transient   {_gib(m.transient)}{outputs}",
                  f"    peak        {_gib(m.peak)}   of {_gib(budget).strip()}"]
    return lines


def format_estimate(e: Estimate) -> str:
    """The full plan: parameters, FLOPs per layer kind, memory per pipeline rank, step time and MFU."""
    c, layout, t = e.config, e.layout, e.time
    tokens = c.train.global_batch_size * c.data.seq_len
    lines = [(f"estimate: {c.model.num_layers} layers '{c.model.pattern}', seq_len {c.data.seq_len}, "
              f"{c.train.precision}, on {e.cluster.nodes} node(s) × {e.cluster.procs_per_node} {e.device.name}"),
             f"layout: world {layout.world_size} = {layout.describe()}",
             f"parameters: {e.total_parameters:,} total, {e.active_parameters:,} active per token",
             "FLOPs per token (forward, per layer; training = 3 × forward):"]
    for kind, (count, flops) in e.flops_by_kind.items():
        lines.append(f"  '{kind}' {LAYER_KINDS[kind].name:<26} ×{count:<3} {flops:.3e}   total {count * flops:.3e}")
    lines.append(f"  LM head                           ×1   {e.head_flops:.3e}")
    lines.append(f"  training FLOPs/token {e.training_flops_per_token:.3e} "
                 f"({e.training_flops_per_token * tokens:.3e} per step of {tokens:,} tokens)")
    lines.append("memory per rank:")
    lines += _memory_lines(e)
    per_micro = (f"compute {t.compute * 1e3:.1f} ms, tp {t.tp * 1e3:.1f} ms, cp {t.cp * 1e3:.1f} ms, "
                 f"ep {t.ep * 1e3:.1f} ms, pp {t.pp * 1e3:.1f} ms")
    per_step = (f"pipeline bubble {t.bubble:.1%}; dp gradient sync {t.dp * 1e3:.0f} ms, "
                f"optimizer {t.optimizer * 1e3:.0f} ms")
    speed = (f"{t.tokens_per_s:,.0f} tokens/s ({t.tokens_per_s / layout.world_size:,.0f} per rank), MFU {t.mfu:.1%} "
             f"(peak {e.device.peak_tflops[c.train.precision]:g} TFLOP/s, matmul efficiency "
             f"{e.device.matmul_efficiency:g})")
    budget = e.device.memory_per_rank(e.cluster.procs_per_node)
    lines += [f"step time (slowest pipeline rank, per micro-batch): {per_micro}",
              f"  × {layout.micro_batches} micro-batches, {per_step}",
              f"  step {t.step:.2f} s, {speed}",
              (f"fits: {'yes' if e.fits else 'NO'} (peak {e.peak.peak / GiB:.1f} GiB on pipeline rank "
               f"{e.peak.rank}, {budget / GiB:.1f} GiB per rank)")]
    return "\n".join(lines)


def format_search(estimates: list[Estimate], limit: int) -> str:
    """A table of layouts, best throughput first."""
    header = (f"{'#':>3}  {'tp':>2} {'sp':>2} {'pp':>2} {'vpp':>3} {'dp':>3} {'cp':>2} {'ep':>2} {'mb':>3} {'rc':>2}  "
              f"{'peak GiB':>8}  {'step s':>7}  {'tokens/s':>10}  {'MFU':>6}  {'bubble':>6}")
    rows = [header]
    for i, e in enumerate(estimates[:limit], 1):
        lo = e.layout
        rows.append(f"{i:>3}  {lo.tp:>2} {'y' if lo.sp else '-':>2} {lo.pp:>2} {lo.vpp:>3} {lo.dp:>3} {lo.cp:>2} "
                    f"{lo.ep:>2} {lo.micro_batch:>3} {'y' if lo.recompute else '-':>2}  {e.peak.peak / GiB:>8.1f}  "
                    f"{e.time.step:>7.2f}  {e.time.tokens_per_s:>10,.0f}  {e.time.mfu:>6.1%}  {e.time.bubble:>6.1%}")
    return "\n".join(rows)
