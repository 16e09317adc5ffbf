"""Streaming the ranks' logs to the driver's terminal, each line prefixed by its rank.

Rank 0 is shown in full; the other ranks only where they warn or fail, so a job of
many ranks reads like one. The files (``<log.dir>/logs/rank_<r>.log``) keep everything.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

import ray
from ray.exceptions import RayError

_NOTABLE = re.compile(r"warn|error|exception|traceback|fatal|killed", re.IGNORECASE)


class NotableLines:
    """Passes warning and error lines, and every line of a Python traceback."""

    def __init__(self):
        self._in_traceback = False

    def __call__(self, line: str) -> bool:
        if line.startswith("Traceback"):
            self._in_traceback = True
        elif self._in_traceback and not line.startswith((" ", "\t")) and line.strip():
            self._in_traceback = False  # the exception line closes the traceback: shown, then back to filtering
            return True
        return self._in_traceback or bool(_NOTABLE.search(line))


class LogStream:
    """Pulls new lines from every worker (``RankWorker.read_log``) and prints them as ``[rank r] line``."""

    def __init__(self, workers: list, out: TextIO = sys.stdout):
        self._workers = workers  # actor handles by rank
        self._offsets = [0] * len(workers)
        self._filters = [None] + [NotableLines() for _ in workers[1:]]
        self._out = out

    def poll(self) -> None:
        """Print what the workers logged since the last poll; a dead worker has nothing more to say."""
        refs = [w.read_log.remote(offset) for w, offset in zip(self._workers, self._offsets)]
        for rank, ref in enumerate(refs):
            try:
                text, self._offsets[rank] = ray.get(ref, timeout=10)
            except RayError:  # dead, or too busy to answer: nothing this time
                continue
            keep = self._filters[rank]
            for line in text.splitlines():
                if keep is None or keep(line):
                    print(f"[rank {rank}] {line}", file=self._out)
        self._out.flush()
