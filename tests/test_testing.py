"""The gloo worker pools that parallel parity tests run on (megamix.testing)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megamix.testing import DistributedTestError, get_pool, run_distributed

REPO = Path(__file__).resolve().parents[1]


# Tasks: module-level, so the workers import them from this file by name.

def all_reduce_rank_plus(offset):
    tensor = torch.tensor([dist.get_rank() + offset, 1.0])
    dist.all_reduce(tensor)
    return dist.get_rank(), tensor


def describe_worker():
    return {key: os.environ[key] for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} | {
        "threads": torch.get_num_threads(), "rank": dist.get_rank(), "backend": dist.get_backend()}


def fail_on_rank_1_then_all_reduce():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 refuses to reduce")
    dist.all_reduce(torch.ones(1))  # waits for rank 1, which never comes


def all_reduce_without_rank_1():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))


def exit_on_rank_1_then_all_reduce():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def fail_everywhere():
    raise KeyError(f"no such key on rank {dist.get_rank()}")


def return_unpicklable():
    return lambda: None


def reduce_in_subgroup():
    group = dist.new_group([0, 1])
    tensor = torch.ones(1)
    if dist.get_rank() in (0, 1):
        dist.all_reduce(tensor, group=group)
    return tensor.item()


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_returns_every_rank_result_in_rank_order(world_size):
    results = run_distributed(all_reduce_rank_plus, world_size, 0.5)
    expected = torch.tensor([sum(range(world_size)) + 0.5 * world_size, float(world_size)])
    assert [rank for rank, _ in results] == list(range(world_size))
    for _, tensor in results:
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected)


def test_workers_look_like_torchrun_ranks():
    for rank, worker in enumerate(run_distributed(describe_worker, 2)):
        assert worker == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                          "threads": 1, "rank": rank, "backend": "gloo"}


def test_pool_is_reused_between_tasks():
    first = run_distributed(os.getpid, 2)
    assert len(set(first)) == 2 and os.getpid() not in first
    assert run_distributed(os.getpid, 2) == first
    assert get_pool(2) is get_pool(2)


def test_subgroups_work_inside_a_task():
    assert run_distributed(reduce_in_subgroup, 4) == [2.0, 2.0, 1.0, 1.0]


def test_exception_on_one_rank_names_it_and_replaces_the_stuck_pool():
    pids = run_distributed(os.getpid, 2)
    with pytest.raises(DistributedTestError) as raised:
        run_distributed(fail_on_rank_1_then_all_reduce, 2)
    message = str(raised.value)
    assert "rank 1 raised ValueError: rank 1 refuses to reduce" in message
    assert "Traceback (most recent call last)" in message and 'raise ValueError("rank 1 refuses' in message
    # Rank 0 is reported stuck, with a stack that shows where.
    stuck = message.split("--- rank 0: stack when killed ---")[1]
    assert "in fail_on_rank_1_then_all_reduce" in stuck and "in all_reduce" in stuck
    fresh = run_distributed(os.getpid, 2)
    assert set(fresh).isdisjoint(pids)


def test_hang_times_out_naming_the_stuck_rank_and_the_next_run_works():
    pids = run_distributed(os.getpid, 2)
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as raised:
        run_distributed(all_reduce_without_rank_1, 2, timeout=3)
    assert time.monotonic() - start < 3 + 3
    message = str(raised.value)
    assert "rank 0 did not finish within the 3 s timeout" in message
    assert "rank 1" not in message
    assert "in all_reduce_without_rank_1" in message
    assert set(run_distributed(os.getpid, 2)).isdisjoint(pids)


def test_a_rank_that_dies_is_reported_and_the_pool_replaced():
    pids = run_distributed(os.getpid, 2)
    with pytest.raises(DistributedTestError, match="rank 1 exited with code 3"):
        run_distributed(exit_on_rank_1_then_all_reduce, 2)
    assert set(run_distributed(os.getpid, 2)).isdisjoint(pids)


def test_failure_on_all_ranks_keeps_the_pool():
    pids = run_distributed(os.getpid, 2)
    with pytest.raises(DistributedTestError) as raised:
        run_distributed(fail_everywhere, 2)
    assert "rank 0 raised KeyError: 'no such key on rank 0'" in str(raised.value)
    assert "rank 1 raised KeyError: 'no such key on rank 1'" in str(raised.value)
    with pytest.raises(DistributedTestError, match="rank 0 returned a result that cannot be pickled"):
        run_distributed(return_unpicklable, 2)
    with pytest.raises(DistributedTestError, match="module-level function"):
        run_distributed(lambda: None, 2)
    assert run_distributed(os.getpid, 2) == pids


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    # The parent dies while its worker is busy in a task, so only the parent watch can end it.
    script = (
        "import os, signal, threading, time\n"
        "from megamix.testing import get_pool\n"
        "pool = get_pool(1)\n"
        "print(*pool.run(os.getpid), flush=True)\n"
        "threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()\n"
        "pool.run(time.sleep, 60)\n")
    # A file, not a pipe: the worker inherits the parent's stdout and would hold a pipe open.
    output = tmp_path / "stdout"
    with output.open("w") as stdout:
        subprocess.run([sys.executable, "-c", script], cwd=REPO, stdout=stdout, timeout=60)
    worker = int(output.read_text().split()[0])
    deadline = time.monotonic() + 5
    while _is_running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _is_running(worker)


def _is_running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; in a container nobody may reap it
