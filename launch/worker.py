"""One training rank as a Ray actor: the torchrun environment, then ``megamix.train.train(config)``.

The actor runs several calls at once (``max_concurrency``), so the driver can read its log
and ask it to stop while ``run`` trains. Nothing here is needed by ``megamix.train``: the
trainer sees only the usual environment variables and an optional stop event.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import ray

from megamix_launch.events import append_record, resume_step


class RankWorker:
    """Created inside a placement-group bundle; ``run`` trains as one rank of the job."""

    def __init__(self, cwd: str):
        # Relative paths in the config (log.dir, datasets) mean what they mean on the driver
        # when the nodes share its file system; elsewhere the worker's own directory is kept.
        if os.path.isdir(cwd):
            os.chdir(cwd)
        self._stop = threading.Event()
        self._log: Path | None = None
        self._log_start = 0

    def location(self) -> tuple[str, tuple[str, ...]]:
        """(Ray node id, the GPU ids Ray gave this actor)."""
        context = ray.get_runtime_context()
        return context.get_node_id(), tuple(str(g) for g in context.get_accelerator_ids().get("GPU", []))

    def free_port(self) -> int:
        """A TCP port free on this node now, for MASTER_PORT (rank 0 binds it moments later)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, env: dict[str, str], config: dict[str, Any], restart: dict[str, Any] | None) -> None:
        """Train as the rank ``env`` describes; output goes to ``<log.dir>/logs/rank_<RANK>.log``.

        ``restart`` (rank 0 only): the driver's reason for this restart, recorded in
        ``metrics.jsonl`` with the step the trainer is about to resume from.
        """
        os.environ.update(env)
        from megamix.config import config_from_dict  # torch loads only now: CUDA_VISIBLE_DEVICES is set
        from megamix.train import train

        cfg = config_from_dict(config)
        self._log = Path(cfg.log.dir) / "logs" / f"rank_{env['RANK']}.log"
        self._log.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self._log.stat().st_size if self._log.exists() else 0
        self._redirect_output(self._log)
        print(f"rank {env['RANK']}/{env['WORLD_SIZE']} pid {os.getpid()} (local rank {env['LOCAL_RANK']}); "
              f"master {env['MASTER_ADDR']}:{env['MASTER_PORT']}", flush=True)
        if restart is not None:
            append_record(Path(cfg.log.dir) / "metrics.jsonl",
                          {"event": "restart", **restart, "resume_step": resume_step(cfg.checkpoint_dir)})
        try:
            train(cfg, stop=self._stop)
        except BaseException:
            traceback.print_exc()  # into the rank's log, which the driver streams
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

    def read_log(self, offset: int) -> tuple[str, int]:
        """Complete lines of this attempt's log from ``offset`` on, and the offset after them."""
        if self._log is None or not self._log.exists():
            return "", offset
        with open(self._log, "rb") as f:
            f.seek(self._log_start + offset)
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]
        return data.decode(errors="replace"), offset + len(data)

    def request_stop(self) -> None:
        """End training at the next step boundary (saving first with checkpoint.save_on_exit)."""
        self._stop.set()

    @staticmethod
    def _redirect_output(path: Path) -> None:
        """Point this process's stdout and stderr (Python and native code alike) at ``path``."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
