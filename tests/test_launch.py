"""The Ray launcher on real Ray: a simulated 2-node cluster, real worker processes, real gloo."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from megamix.config import load_config  # noqa: E402
from megamix.errors import ConfigError, TrainingError  # noqa: E402
from megamix.train import Trainer  # noqa: E402
from megamix_launch.events import append_record  # noqa: E402
from megamix_launch.logs import NotableLines  # noqa: E402
from megamix_launch.ranks import Placement, assign_ranks  # noqa: E402
from megamix_launch.options import LaunchOptions
from megamix_launch.supervise import launch  # noqa: E402

BASE = "configs/tiny-dense.yaml"
TINY = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=96",
        "data.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8", "train.warmup_steps=2",
        "log.interval=1", "log.tensorboard=false", "log.progress=never"]
STEPS = 30
CHECKPOINT_EVERY = 5
# Ray's own test-cluster settings measured on this machine (docs/launch.md, REFERENCE.md).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
NODE = {"num_cpus": 2, "object_store_memory": 100 * 2**20}


def overrides(cache, run_dir, *extra):
    return [*TINY, f"data.cache_dir={cache}", f"log.dir={run_dir}", f"train.steps={STEPS}",
            f"checkpoint.interval={CHECKPOINT_EVERY}", *extra]


def step_records(run_dir):
    """Last record per step (a restarted run logs the steps after its checkpoint again); every line is JSON."""
    records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "event" not in r}, [r for r in records if "event" in r]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray "nodes" of 2 CPUs each on this machine, the test process connected as the driver."""
    saved = {key: os.environ.get(key) for key in [*RAY_ENV, "RAY_TMPDIR"]}
    os.environ.update(RAY_ENV, RAY_TMPDIR=str(tmp_path_factory.mktemp("ray")))
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def tp2_dp2_run(cluster, tmp_path_factory, builtin_cache):
    """An uninterrupted tp=2 × dp=2 job over the 2 nodes; its run directory."""
    run_dir = tmp_path_factory.mktemp("tp2dp2") / "run"
    config = load_config(BASE, overrides(builtin_cache, run_dir, "parallel.tp=2"))
    assert launch(config, LaunchOptions(nodes=2, procs_per_node=2), out=io.StringIO()) == 0
    return run_dir


def test_tp2_dp2_on_two_nodes_matches_one_process(tp2_dp2_run, tmp_path, builtin_cache):
    records, events = step_records(tp2_dp2_run)
    assert sorted(records) == list(range(1, STEPS + 1)) and events == []
    assert sorted(p.name for p in (tp2_dp2_run / "logs").iterdir()) == [f"rank_{r}.log" for r in range(4)]
    losses = Trainer(load_config(BASE, overrides(builtin_cache, tmp_path / "one"))).run()
    assert [records[s]["loss"] for s in range(1, STEPS + 1)] == pytest.approx(losses, rel=1e-5)


def _kill_rank_after(run_dir: Path, rank: int, step: int, killed: list) -> None:
    """Watch metrics.jsonl; once ``step`` is logged, SIGKILL the rank (its pid heads its log)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            header = (run_dir / "logs" / f"rank_{rank}.log").read_text().split()
            pid = int(header[header.index("pid") + 1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.02)


def test_killed_worker_restarts_from_checkpoint_with_identical_losses(tp2_dp2_run, tmp_path, builtin_cache):
    run_dir = tmp_path / "run"
    config = load_config(BASE, overrides(builtin_cache, run_dir, "parallel.tp=2"))
    killed = []
    watcher = threading.Thread(target=_kill_rank_after, args=(run_dir, 1, CHECKPOINT_EVERY + 2, killed))
    watcher.start()
    out = io.StringIO()
    restarts = launch(config, LaunchOptions(nodes=2, procs_per_node=2, max_restarts=2), out=out)
    watcher.join()
    assert killed and restarts == 1, out.getvalue()
    records, events = step_records(run_dir)
    (event,) = events
    assert event["event"] == "restart" and event["restart"] == 1 and "rank 1 died" in event["reason"]
    assert event["resume_step"] % CHECKPOINT_EVERY == 0 and 0 < event["resume_step"] < STEPS
    expected, _ = step_records(tp2_dp2_run)
    assert [records[s]["loss"] for s in range(1, STEPS + 1)] == [expected[s]["loss"] for s in range(1, STEPS + 1)]
    assert "restart 1 of 2" in out.getvalue()


def test_too_few_resources_is_a_clear_error(cluster, tmp_path, builtin_cache):
    config = load_config(BASE, overrides(builtin_cache, tmp_path / "run"))
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot host 6 ranks.*needs 6 CPU \(cluster has 4"):
        launch(config, LaunchOptions(nodes=3, procs_per_node=2, resource_timeout_s=1))
    assert time.monotonic() - start < 15


def test_max_restarts_0_fails_fast_with_the_workers_traceback(cluster, tmp_path, builtin_cache):
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("")
    config = load_config(BASE, overrides(not_a_dir, tmp_path / "run"))
    out = io.StringIO()
    with pytest.raises(TrainingError, match=r"rank \d raised FileExistsError.*--max-restarts 0"):
        launch(config, LaunchOptions(nodes=1, procs_per_node=2, max_restarts=0), out=out)
    assert "Traceback (most recent call last)" in out.getvalue() and "FileExistsError" in out.getvalue()


def test_cli_embedded_local_ray_sigterm_saves_on_exit(tmp_path, builtin_cache):
    """No --address: the CLI starts its own Ray and trains 2 ranks; SIGTERM stops them at a step
    boundary, and with checkpoint.save_on_exit they save that step first."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "megamix", "launch", BASE,
               *overrides(builtin_cache, run_dir, "train.steps=100000", "checkpoint.save_on_exit=true"),
               "--procs-per-node", "2"]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    out, err = driver.communicate(timeout=90)
    assert driver.returncode == 130, err
    assert "[rank 0] rank 0/2" in out and "stopping 2 ranks at the next step boundary" in out
    last = max(step_records(run_dir)[0])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last}"
    refused = subprocess.run([*command, "--nodes", "2"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--nodes 2: an embedded local Ray has one node" in refused.stderr


def test_ranks_sorted_by_ip_then_node_and_contiguous_per_node():
    placements = [Placement("10.0.0.10", "b", ("1",)), Placement("10.0.0.9", "a", ("0",)),
                  Placement("10.0.0.10", "b", ("0",)), Placement("10.0.0.9", "a", ("1",))]
    slots = assign_ranks(placements)
    assert [(s.worker, s.rank, s.local_rank, s.local_world_size) for s in slots] == [
        (1, 0, 0, 2), (3, 1, 1, 2), (2, 2, 0, 2), (0, 3, 1, 2)]
    assert slots[3].node_gpus == ("0", "1")


def test_other_ranks_show_only_warnings_errors_and_tracebacks():
    keep = NotableLines()
    lines = ["step 1", "UserWarning: x", "Traceback (most recent call last):", '  File "a.py", line 1',
             "ValueError: bad", "step 2"]
    assert [line for line in lines if keep(line)] == lines[1:5]


def test_restart_record_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    append_record(path, {"event": "restart", "restart": 1})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1}, {"event": "restart", "restart": 1}]
