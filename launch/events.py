"""Launcher records in ``<log.dir>/metrics.jsonl``, beside the trainer's step records.

A record ``{"event": "restart", "restart": n, "reason": "...", "resume_step": s}`` marks
each restart; readers of step records skip lines with an ``event`` key (docs/launch.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megamix import checkpoint


def resume_step(checkpoint_dir: str | Path) -> int:
    """The step the trainer will resume from (train.resume=auto): the latest complete checkpoint, or 0."""
    latest = checkpoint.latest_checkpoint(checkpoint_dir)
    return checkpoint.read_meta(latest)["step"] if latest is not None else 0


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line, first cutting a torn last line (rank 0 killed mid-write): every line stays JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(max(0, size - 65536))
            tail = f.read()
            if not tail.endswith(b"\n"):
                f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
        f.write(json.dumps(record).encode() + b"\n")
