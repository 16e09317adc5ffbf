"""Run every benchmark in bench/ and keep the results: ``bench/results/<date>-<host>.json`` plus a table
(``<date>-<host>-quick.json`` for ``--quick``).

Every ``bench/*.py`` script but this one is a benchmark. Each runs as its own process (``python bench/<name>.py ...``, as its docs say), one after
another so that they do not load the machine for each other; each prints one JSON object, which is
stored whole under its name with the command, the exit status and the wall time. A benchmark that
fails is recorded with the tail of its output and the others still run. ``--quick`` passes each
benchmark the small sizes of a smoke run (minutes in all on the 2-core dev VM): numbers from it say
that everything runs, not how fast.

    python bench/run_all.py                  # full sizes (long: mixers and context_parallel dominate)
    python bench/run_all.py --quick          # smoke run
    python bench/run_all.py --only comm,pipeline
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# Arguments of a --quick run of each benchmark (full runs pass none: each script's defaults are its
# documented measurement). A script added to bench/ runs too, with its defaults in both modes.
QUICK_ARGS: dict[str, list[str]] = {
    "train_step": ["--steps", "2", "--warmup", "1", "--seq-len", "128", "--batch", "2", "--precision", "fp32"],
    "comm": ["--seq-len", "32", "--micro-batches", "1"],
    "pipeline": ["--micro-batches", "4", "--steps", "1"],
    "mixers": ["--quick"],
    "moe": ["--quick"],
    "context_parallel": ["--tokens-per-rank", "512,1024", "--repeats", "1"],
    "convert": ["--repeats", "1"],
    "launch": [],
}


def benchmarks() -> list[str]:
    """Every benchmark script in bench/: those known to QUICK_ARGS in its order, then any other."""
    found = {path.stem for path in BENCH.glob("*.py") if path.stem != Path(__file__).stem}
    return [name for name in QUICK_ARGS if name in found] + sorted(found - QUICK_ARGS.keys())


# Leaves of a result whose key path names one of these words (and is no target) make its headline in the table.
HEADLINE_WORDS = ("ratio", "speedup", "growth", "over", "recovery", "tokens_per_s", "mfu")
HEADLINE_ITEMS = 4


def parse_json(output: str) -> dict:
    """The JSON object a benchmark printed (the first one in its stdout)."""
    start = output.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    return json.JSONDecoder().raw_decode(output[start:])[0]


def run_benchmark(name: str, quick: bool, timeout: float) -> dict:
    """Run ``bench/<name>.py``; its record: command, seconds, returncode, and result or error."""
    command = [sys.executable, str(BENCH / f"{name}.py"), *(QUICK_ARGS.get(name, []) if quick else [])]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=BENCH.parent,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"command": command, "seconds": timeout, "returncode": None, "error": f"timed out after {timeout} s"}
    record = {"command": command, "seconds": round(time.perf_counter() - start, 1), "returncode": done.returncode}
    try:
        if done.returncode:
            raise ValueError(f"exit status {done.returncode}")
        record["result"] = parse_json(done.stdout)
    except ValueError as error:
        record["error"] = f"{error}; output ends: {(done.stdout + done.stderr)[-2000:]}"
    return record


def leaves(tree, prefix: str = ""):
    """(dotted key, number) for every numeric leaf of a JSON tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from leaves(value, f"{prefix}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix, tree


def headline(record: dict) -> str:
    if "error" in record:
        return "FAILED: " + record["error"].splitlines()[0]
    found = [(key, value) for key, value in leaves(record["result"])
             if any(word in key.lower() for word in HEADLINE_WORDS) and "target" not in key.lower()]
    return "; ".join(f"{key} {value:.3g}" for key, value in found[:HEADLINE_ITEMS]) or "ok"


def table(records: dict[str, dict]) -> str:
    rows = [f"{'benchmark':<18} {'seconds':>8}  headline", f"{'-' * 18} {'-' * 8}  {'-' * 40}"]
    rows += [f"{name:<18} {r['seconds']:>8}  {headline(r)}" for name, r in records.items()]
    return "\n".join(rows)


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": gpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes for every benchmark")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(benchmarks())}")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per benchmark (default 7200)")
    parser.add_argument("--output", type=Path,
                        help="result file (default bench/results/<date>-<host>.json, <date>-<host>-quick.json)")
    args = parser.parse_args()
    known = benchmarks()
    names = known if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
    now = datetime.datetime.now(datetime.timezone.utc)
    info = machine()
    records = {}
    for name in names:
        print(f"running {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        records[name] = run_benchmark(name, args.quick, args.timeout)
    output = args.output or BENCH / "results" / f"{now:%Y-%m-%d}-{info['host']}{'-quick' if args.quick else ''}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"date": now.isoformat(timespec="seconds"), "machine": info, "quick": args.quick,
                                  "benchmarks": records}, indent=1) + "\n")
    print(table(records))
    print(f"\nwritten to {output}")
    if any("error" in r for r in records.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
