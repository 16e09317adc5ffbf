"""PNG plots of a results file (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megamix.errors import ConfigError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'megamix[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def niah_heatmap(cells: list[dict[str, Any]], path: Path) -> Path:
    """Needle-in-a-haystack score (%) over depth (rows) × context length (columns)."""
    plt = _pyplot()
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = [[next((c["value"] for c in cells if c["length"] == n and c["depth"] == d), float("nan"))
             for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 1.5))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title("needle in a haystack: score (%)")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def scores_by_length(cells: list[dict[str, Any]], path: Path) -> Path:
    """One line per generation task: its mean score (%) at each context length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in sorted({c["task"] for c in cells}):
        lengths = sorted({c["length"] for c in cells if c["task"] == task})
        means = [sum(v := [c["value"] for c in cells if c["task"] == task and c["length"] == n]) / len(v)
                 for n in lengths]
        ax.plot(lengths, means, marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def perplexity(cells: list[dict[str, Any]], path: Path) -> Path:
    """Left: perplexity by context length; right: mean loss by position (log-spaced bins) per length."""
    plt = _pyplot()
    cells = sorted(cells, key=lambda c: c["length"])
    fig, (by_length, by_position) = plt.subplots(1, 2, figsize=(11, 4.5))
    by_length.plot([c["length"] for c in cells], [c["value"] for c in cells], marker="o")
    by_length.set_xscale("log", base=2)
    by_length.set_xlabel("context length (tokens)")
    by_length.set_ylabel("perplexity")
    for cell in cells:
        starts, stops, losses = zip(*cell["by_position"])
        by_position.plot([(a + b) / 2 for a, b in zip(starts, stops)], losses, marker=".", label=str(cell["length"]))
    by_position.set_xscale("log")
    by_position.set_xlabel("position in the window")
    by_position.set_ylabel("loss (nats)")
    by_position.legend(title="length", fontsize=7)
    for ax in (by_length, by_position):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
