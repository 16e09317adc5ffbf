"""One JSON file per evaluation run: settings, every per-sample record, a summary per cell, the table.

The file is rewritten atomically after each finished cell (one task at one length, and depth), so an
interrupted run resumes where it stopped: cells already in the file are skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megamix.errors import ConfigError

RESULTS_FILE = "results.json"


def cell_key(task: str, length: int, depth: float | None = None) -> str:
    return f"{task}/{length}" if depth is None else f"{task}/{length}/{depth:g}"


class ResultStore:
    """``<out_dir>/results.json``: ``{"model", "settings", "cells": {key: summary}, "records": [...],
    "summary": table rows}``. Writes only where ``write`` (rank 0 of a distributed run)."""

    def __init__(self, out_dir: str | Path, model: str, settings: dict[str, Any], write: bool = True):
        self.path = Path(out_dir) / RESULTS_FILE
        self.write = write
        self.data: dict[str, Any] = {"model": model, "settings": settings, "cells": {}, "records": [], "summary": []}
        if self.path.is_file():
            previous = json.loads(self.path.read_text())
            if previous.get("settings") != settings:
                raise ConfigError(f"{self.path} was written with other settings ({previous.get('settings')}); "
                                  f"resume with those, or write to another --out directory")
            self.data.update(cells=previous["cells"], records=previous["records"])

    def done(self, key: str) -> bool:
        return key in self.data["cells"]

    def add(self, key: str, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.data["cells"][key] = summary
        self.data["records"] += records
        self.save()

    def save(self) -> None:
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=1))
        os.replace(temporary, self.path)

    def summarize(self, tasks: list[str], lengths: list[int]) -> str:
        """Store and return the table: one row per task, one column per length — the mean score in %
        (the needle-in-a-haystack cell averages its depths) or, for perplexity, the perplexity."""
        rows, cells = [], self.data["cells"].values()
        for task in tasks:
            row = {"task": task}
            for length in lengths:
                values = [c["value"] for c in cells if c["task"] == task and c["length"] == length]
                row[str(length)] = round(sum(values) / len(values), 3) if values else None
            rows.append(row)
        self.data["summary"] = rows
        self.save()
        width = max(len(t) for t in tasks)
        lines = [f"{'task':<{width}}  " + "  ".join(f"{n:>9}" for n in lengths)]
        for row in rows:
            lines.append(f"{row['task']:<{width}}  " + "  ".join(
                f"{'-' if row[str(n)] is None else format(row[str(n)], '.2f'):>9}" for n in lengths))
        return "\n".join(lines)
