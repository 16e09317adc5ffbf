"""Run a suite over context lengths: build the samples, generate, score, record, summarize, plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megamix.errors import ConfigError
from megamix.eval import plots
from megamix.eval.generate import PREFILL_CHUNK, generate
from megamix.eval.loading import EvalModel
from megamix.eval.perplexity import load_tokens, position_bins, window_losses, windows
from megamix.eval.results import ResultStore, cell_key
from megamix.eval.scoring import METRICS
from megamix.eval.tasks import PERPLEXITY, TASKS, fit_to_length
from megamix.parallel import ParallelState

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class SuiteSettings:
    """What a run's records depend on (a resumed run must use the same)."""

    seed: int = 0
    samples: int = 5  # per cell: prompts for generation tasks, windows for perplexity
    depths: tuple[float, ...] = DEPTHS
    tokens: str | None = None  # held-out token file of the perplexity task
    batch_size: int = 4
    prefill_chunk: int = PREFILL_CHUNK

    def recorded(self) -> dict[str, Any]:
        return {"seed": self.seed, "samples": self.samples, "tokens": self.tokens}


def generation_cell(em: EvalModel, task_name: str, length: int, depth: float | None,
                    settings: SuiteSettings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``settings.samples`` prompts of one task fitted to ``length`` tokens, answered greedily, scored."""
    task, tokenizer = TASKS[task_name], em.tokenizer
    key = cell_key(task_name, length, depth)
    samples = [fit_to_length(task, em.count_tokens, length, f"{settings.seed}/{key}/{i}", depth)
               for i in range(settings.samples)]
    records = []
    for start in range(0, len(samples), settings.batch_size):
        batch = samples[start:start + settings.batch_size]
        outputs = generate(em.model, [tokenizer.encode(s.prompt) for s, _ in batch], task.max_new_tokens,
                           eos_id=tokenizer.eos_id, decode=tokenizer.decode,
                           prefill_chunk=settings.prefill_chunk)
        for index, ((sample, prompt_tokens), out) in enumerate(zip(batch, outputs), start):
            records.append({"task": task_name, "length": length, "depth": depth, "index": index,
                            "prompt_tokens": prompt_tokens, "answers": sample.answers, "output": out.text,
                            "score": METRICS[task.metric](out.text, sample.answers)})
    value = 100 * sum(r["score"] for r in records) / len(records)
    return {"task": task_name, "length": length, "depth": depth, "value": value, "samples": len(records)}, records


def perplexity_cell(em: EvalModel, tokens, length: int, settings: SuiteSettings,
                    parallel: ParallelState) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Perplexity of up to ``settings.samples`` windows of ``length`` tokens, and the loss by position."""
    batches = windows(tokens, length, settings.samples).split(settings.batch_size)
    losses = torch.cat([window_losses(em.model, batch, parallel) for batch in batches])  # [windows, length]
    records = [{"task": PERPLEXITY, "length": length, "index": i, "loss": loss}
               for i, loss in enumerate(losses.mean(dim=1).tolist())]
    loss = losses.mean().item()
    by_position = [[a, b, losses[:, a:b].mean().item()] for a, b in position_bins(length)]
    return {"task": PERPLEXITY, "length": length, "depth": None, "value": float(torch.tensor(loss).exp()),
            "loss": loss, "samples": len(records), "by_position": by_position}, records


def run_suite(em: EvalModel, tasks: list[str], lengths: list[int], out_dir: str | Path,
              settings: SuiteSettings | None = None, parallel: ParallelState | None = None) -> str:
    """Evaluate every task at every length (and depth) into ``<out_dir>/results.json`` and PNG plots;
    returns the summary table. Cells found in an existing results file are skipped."""
    settings = settings or SuiteSettings()
    parallel = parallel or ParallelState.single()
    for length in lengths:
        em.check_length(length)
    generation = [t for t in tasks if t != PERPLEXITY]
    if generation and parallel.world_size > parallel.tp.size:
        raise ConfigError(f"generation tasks ({', '.join(generation)}) run under tensor parallelism (--tp) only; "
                          f"context-parallel (--cp) evaluation covers the perplexity task")
    if PERPLEXITY in tasks and settings.tokens is None:
        raise ConfigError("the perplexity task needs a held-out token file: --tokens PREFIX (or a text file)")
    for task in generation:  # a length too short for a task fails now, not after hours of other cells
        for length in lengths:
            fit_to_length(TASKS[task], em.count_tokens, length, "check", 0.0)
    store = ResultStore(out_dir, em.source, settings.recorded(), write=parallel.rank == 0)
    tokens = load_tokens(settings.tokens, em.tokenizer.encode) if PERPLEXITY in tasks else None
    for task in tasks:
        for length in lengths:
            for depth in (settings.depths if task in TASKS and TASKS[task].depths else [None]):
                key = cell_key(task, length, depth)
                if store.done(key):
                    continue
                cell = (perplexity_cell(em, tokens, length, settings, parallel) if task == PERPLEXITY
                        else generation_cell(em, task, length, depth, settings))
                store.add(key, *cell)
    table = store.summarize(tasks, lengths)
    if parallel.rank == 0:
        write_plots(list(store.data["cells"].values()), Path(out_dir))
    return table


def write_plots(cells: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """The PNGs of what the cells hold: scores by length, the needle heatmap, perplexity."""
    written = []
    generation = [c for c in cells if c["task"] != PERPLEXITY]
    if generation:
        written.append(plots.scores_by_length(generation, out_dir / "scores_by_length.png"))
    if niah := [c for c in cells if c["task"] == "niah"]:
        written.append(plots.niah_heatmap(niah, out_dir / "niah_heatmap.png"))
    if ppl := [c for c in cells if c["task"] == PERPLEXITY]:
        written.append(plots.perplexity(ppl, out_dir / "perplexity.png"))
    return written
