"""Launcher overhead and recovery time on this machine. Prints one JSON object.

Measured, for the same 2-rank job (tiny-dense, shrunk):
  launch_first_step_s    command start → first step record in metrics.jsonl, `megamix launch
                         --procs-per-node 2` with an embedded local Ray
  torchrun_first_step_s  the same for `python -m torch.distributed.run --standalone
                         --nproc-per-node 2 -m megamix train`
  launch_overhead_s      their difference (target ≤ 15 s)
  recovery_s             SIGKILL of rank 1 (after a checkpoint) → first step record after the
                         restart (target ≤ 30 s plus the checkpoint load, which for this model
                         takes milliseconds and is included)

    python bench/launch.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = "configs/tiny-dense.yaml"
JOB = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=96",
       "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=100000",
       "checkpoint.interval=5", "log.interval=1", "log.tensorboard=false", "log.progress=never"]
TIMEOUT_S = 300


def records(run_dir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl so far."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def wait_for(condition, what: str) -> float:
    """Poll ``condition`` every 20 ms; the time it became true."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {TIMEOUT_S} s")
        time.sleep(0.02)
    return time.monotonic()


def start(command: list[str]) -> tuple[subprocess.Popen, float]:
    started = time.monotonic()
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), started


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the driver (torchrun and megamix launch both stop their workers) and reap it."""
    process.terminate()
    process.wait(timeout=120)


def first_step_s(command: list[str], run_dir: Path) -> tuple[subprocess.Popen, float]:
    process, started = start(command)
    return process, wait_for(lambda: records(run_dir), "step record") - started


def bench_torchrun(root: Path) -> float:
    run_dir = root / "torchrun"
    process, seconds = first_step_s([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "2", "-m", "megamix", "train", CONFIG, *JOB,
                                     f"log.dir={run_dir}"], run_dir)
    stop(process)
    return seconds


def bench_launch(root: Path) -> tuple[float, float]:
    """(first step, recovery) of one `megamix launch` run: rank 1 is killed after step 6."""
    run_dir = root / "launch"
    process, seconds = first_step_s([sys.executable, "-m", "megamix", "launch", CONFIG, *JOB,
                                     f"log.dir={run_dir}", "--procs-per-node", "2"], run_dir)
    wait_for(lambda: any(r.get("step", 0) >= 6 for r in records(run_dir)), "step 6")
    header = (run_dir / "logs" / "rank_1.log").read_text().split()
    os.kill(int(header[header.index("pid") + 1]), signal.SIGKILL)
    killed = time.monotonic()

    def stepped_after_restart() -> bool:
        seen = records(run_dir)
        restart = next((i for i, r in enumerate(seen) if r.get("event") == "restart"), None)
        return restart is not None and any("step" in r for r in seen[restart + 1:])

    recovered = wait_for(stepped_after_restart, "step after the restart")
    stop(process)
    return seconds, recovered - killed


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="megamix-bench-launch-") as tmp:
        root = Path(tmp)
        torchrun = bench_torchrun(root)
        launch, recovery = bench_launch(root)
    print(json.dumps({"launch_first_step_s": round(launch, 2), "torchrun_first_step_s": round(torchrun, 2),
                      "launch_overhead_s": round(launch - torchrun, 2), "recovery_s": round(recovery, 2),
                      "targets": {"launch_overhead_s": 15, "recovery_s": 30}}, indent=2))


if __name__ == "__main__":
    main()
