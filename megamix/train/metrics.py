"""Run metrics: ``<run_dir>/metrics.jsonl``, TensorBoard when installed, a progress bar on a terminal.

Only rank 0 logs. One JSON object per logged step with at least
``step, loss, lr, grad_norm, tokens, tokens_per_s, step_time_s, mem_peak_mb``
(DESIGN.md §5), plus ``mfu`` where the device peak is known.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional dependency
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class MetricsLogger:
    """Appends step records; ``progress`` is ``always``, ``never`` or ``auto`` (when stderr is a terminal)."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: str = "auto"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a")
        self._tensorboard = _tensorboard_writer(self.run_dir) if tensorboard else None
        show = progress == "always" or (progress == "auto" and sys.stderr.isatty())
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) if show else None

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._bar is not None:
            self._bar.close()
