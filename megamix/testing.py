"""Run a function on N gloo ranks from a test, with worker pools that live for the whole session.

Spawning processes and importing torch costs seconds, so parity tests send each case to a pool
of worker processes per world size instead of launching ranks per test (DESIGN.md §3):

    sums = run_distributed(all_reduce_rank, 2)  # all_reduce_rank() on ranks 0 and 1, in rank order

`fn` must be picklable by reference (a module-level function); its arguments and results are
pickled, CPU tensors included. Worker output goes to the parent's stdout/stderr.

This module must not import torch at module level: workers import it before they set
OMP_NUM_THREADS, which torch only reads on import.
"""

import atexit
import contextlib
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

_HOST = "127.0.0.1"
# After one rank failed, the others get this long to return before they count as stuck, most
# likely waiting for the failed rank in a collective (gloo itself waits 30 minutes).
_GRACE_AFTER_FAILURE_S = 2.0
_STACK_DUMP_WAIT_S = 2.0
_SHUTDOWN_WAIT_S = 5.0
_ORPHAN_POLL_S = 0.5


class DistributedTestError(Exception):
    """A task failed or hung on some ranks; the message names them with their tracebacks."""


class DistributedPool:
    """`world_size` spawned workers in one gloo process group, running tasks until shut down.

    Rank r sees RANK=LOCAL_RANK=r, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    as under torchrun, runs torch with one thread, and keeps the default process group
    between tasks. When a task leaves some rank unfinished or dead, the pool kills itself
    (`closed` becomes true) and `get_pool` starts a fresh one.
    """

    def __init__(self, world_size: int, timeout: float = 120.0):
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self._processes = []
        self._start()

    @property
    def closed(self) -> bool:
        """True once shut down or killed after a failure."""
        return not self._processes

    def run(self, fn, *args, timeout: float | None = None, **kwargs) -> list:
        """Run `fn(*args, **kwargs)` on every rank at once; return the results in rank order.

        Raises DistributedTestError if any rank raises or the ranks do not all finish within
        `timeout` seconds (default: the pool's timeout).
        """
        if self.closed:
            raise DistributedTestError(f"the pool of {self.world_size} ranks is shut down")
        timeout = self.timeout if timeout is None else timeout
        try:
            task = pickle.dumps((fn, args, kwargs))
        except Exception as error:
            raise DistributedTestError(
                f"cannot send {fn!r} to the workers: {error} (fn must be a module-level function; "
                "args and kwargs must be picklable)") from error
        try:
            for conn in self._conns:
                conn.send_bytes(task)
            replies, unfinished = self._collect(timeout)
        except BaseException:
            # Interrupted mid-task (e.g. Ctrl-C): the workers' state is unknown.
            self._stop(graceful=False)
            raise
        name = getattr(fn, "__qualname__", repr(fn))
        return self._conclude(f"{name} on {self.world_size} ranks", replies, unfinished, timeout)

    def shutdown(self) -> None:
        """Stop the workers; safe to call more than once."""
        self._stop(graceful=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.shutdown()

    def _start(self) -> None:
        import torch.distributed as dist

        # multiprocessing registered its exit hook on import, before this one, so this one runs
        # first: that hook joins non-daemon children and would wait for workers never told to stop.
        atexit.register(self.shutdown)
        # The parent hosts the rendezvous store, as torchrun's agent does: port 0 lets the OS
        # pick a free port, with no window for another process to take it before the ranks bind.
        self._store = dist.TCPStore(_HOST, 0, is_master=True, wait_for_workers=False)
        # Each worker writes its stacks to a file that the parent also holds open, so the folder
        # can go once the workers have opened theirs and no path outlives a killed session.
        self._stack_dir = tempfile.mkdtemp(prefix="megamix-pool-")
        context = multiprocessing.get_context("spawn")  # forking a process with torch threads can deadlock
        self._conns, self._stack_files = [], []
        for rank in range(self.world_size):
            stack_path = os.path.join(self._stack_dir, f"rank{rank}.txt")
            self._stack_files.append(open(stack_path, "w+", errors="replace"))
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_serve, args=(rank, self.world_size, self._store.port, child_end, os.getpid(), stack_path),
                name=f"megamix-pool{self.world_size}-rank{rank}")
            process.start()
            child_end.close()  # only the worker holds it now, so its death reads as EOF here
            self._processes.append(process)
            self._conns.append(parent_end)
        replies, unfinished = self._collect(self.timeout)
        shutil.rmtree(self._stack_dir, ignore_errors=True)
        try:
            self._conclude(f"starting {self.world_size} ranks", replies, unfinished, self.timeout)
        except DistributedTestError:
            self._stop(graceful=False)  # ranks that failed to join have exited
            raise

    def _conclude(self, what: str, replies: dict, unfinished: list, timeout: float) -> list:
        """The results in rank order, or DistributedTestError; a pool left inconsistent is stopped."""
        stacks = self._dump_stacks(unfinished)
        if unfinished or any(status == "died" for status, _ in replies.values()):
            self._stop(graceful=False)
        failed = {rank: reply for rank, (status, reply) in replies.items() if status != "ok"}
        if failed or unfinished:
            raise DistributedTestError(_describe_failure(what, failed, unfinished, stacks, timeout))
        return [replies[rank][1] for rank in range(self.world_size)]

    def _collect(self, timeout: float) -> tuple[dict, list]:
        """Wait for the ranks' replies: ({rank: (status, payload)}, ranks that never replied)."""
        deadline = time.monotonic() + timeout
        waiting = dict(enumerate(self._conns))
        replies = {}
        while waiting:
            ready = multiprocessing.connection.wait(list(waiting.values()), max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for rank, conn in list(waiting.items()):
                if conn in ready:
                    del waiting[rank]
                    replies[rank] = self._receive(rank, conn)
            if any(status != "ok" for status, _ in replies.values()):
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
        return replies, sorted(waiting)

    def _receive(self, rank: int, conn) -> tuple[str, object]:
        try:
            message = conn.recv_bytes()
        except EOFError:
            process = self._processes[rank]
            process.join(_SHUTDOWN_WAIT_S)
            return "died", (f"exited with code {process.exitcode}", self._read_stack(rank))
        try:
            return pickle.loads(message)
        except Exception as error:
            return "raised", (f"returned a result that cannot be unpickled here: {error!r}", traceback.format_exc())

    def _dump_stacks(self, ranks: list) -> dict:
        """Where each rank is stuck, from faulthandler (it dumps even while a collective blocks)."""
        for rank in ranks:
            with contextlib.suppress(ProcessLookupError):  # it may have died since
                os.kill(self._processes[rank].pid, signal.SIGUSR1)
        deadline = time.monotonic() + _STACK_DUMP_WAIT_S
        stacks = {}
        for rank in ranks:
            text, size = "", -1
            # The dump is written in several pieces: wait until the file stops growing.
            while time.monotonic() < deadline and (not text or len(text) != size):
                size = len(text)
                time.sleep(0.05)
                text = self._read_stack(rank)
            stacks[rank] = text or "(no stack was dumped)"
        return stacks

    def _stop(self, graceful: bool) -> None:
        if self.closed:
            return
        atexit.unregister(self.shutdown)
        for conn in self._conns:
            conn.close()  # a worker leaves its task loop on EOF
        for process in self._processes:
            if graceful:
                process.join(_SHUTDOWN_WAIT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for file in self._stack_files:
            file.close()
        self._processes, self._conns, self._stack_files = [], [], []
        self._store = None
        shutil.rmtree(self._stack_dir, ignore_errors=True)  # still there if start-up was interrupted

    def _read_stack(self, rank: int) -> str:
        """What faulthandler wrote for `rank`: a crash report or the stacks dumped on SIGUSR1."""
        file = self._stack_files[rank]
        file.seek(0)
        return file.read()


_pools: dict[int, DistributedPool] = {}


def get_pool(world_size: int) -> DistributedPool:
    """The pool for `world_size` in this process: started on first use, replaced once broken.

    Starting lazily matters: workers copy `sys.path` at start, and it must already hold what
    pytest added so that test modules import in the workers. Pools stop at interpreter exit.
    """
    pool = _pools.get(world_size)
    if pool is None or pool.closed:
        pool = _pools[world_size] = DistributedPool(world_size)
    return pool


def full_gradients(model, parallel) -> dict:
    """Every parameter's global gradient (after the TP sum of partial gradients the optimizer does),
    to compare a parallel run with one process."""
    from megamix.parallel.sharding import full_tensor, sharding_of, sum_partial_gradient

    grads = {}
    for name, param in model.named_parameters():
        sharding = sharding_of(param, parallel.tp.size)
        if sharding.partial_grads:
            sum_partial_gradient(param.grad, sharding, parallel.tp)
        grads[name] = full_tensor(param.grad, sharding, parallel.tp)
    return grads


def run_distributed(fn, world_size: int, *args, timeout: float | None = None, **kwargs) -> list:
    """`fn(*args, **kwargs)` on `world_size` ranks of the shared pool; results in rank order."""
    return get_pool(world_size).run(fn, *args, timeout=timeout, **kwargs)


def _describe_failure(what: str, failed: dict, unfinished: list, stacks: dict, timeout: float) -> str:
    problems = [f"rank {rank} {summary}" for rank, (summary, _) in sorted(failed.items())]
    if unfinished:
        waited = (f"{_GRACE_AFTER_FAILURE_S:g} s after the failure (waiting for it in a collective?)"
                  if failed else f"the {timeout:g} s timeout")
        problems += [f"rank {rank} did not finish within {waited}" for rank in unfinished]
    sections = [f"--- rank {rank}: {summary} ---\n{detail}" for rank, (summary, detail) in sorted(failed.items())]
    sections += [f"--- rank {rank}: stack when killed ---\n{stacks[rank]}" for rank in unfinished]
    return f"{what}: " + "; ".join(problems) + "\n\n" + "\n".join(sections)


def _serve(rank: int, world_size: int, port: int, conn, parent_pid: int, stack_path: str) -> None:
    """Worker main: join the process group, then run tasks from `conn` until it closes."""
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR=_HOST, MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    # Ctrl-C reaches the whole terminal process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    stack_file = open(stack_path, "a")
    faulthandler.enable(stack_file, all_threads=True)
    faulthandler.register(signal.SIGUSR1, stack_file, all_threads=True)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.TCPStore(_HOST, port, world_size, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        reply = ("ok", None)
    except BaseException as error:
        reply = ("raised", (f"could not join the process group: {type(error).__name__}: {error}",
                            traceback.format_exc()))
    conn.send_bytes(pickle.dumps(reply))
    if reply[0] != "ok":
        return
    while True:
        try:
            task = conn.recv_bytes()
        except EOFError:
            break
        conn.send_bytes(_run_task(task))
    # Interpreter teardown with torch loaded takes up to seconds per worker; skipping it makes
    # shutdown instant, and the output streams are all there is left to flush.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_task(task: bytes) -> bytes:
    try:
        fn, args, kwargs = pickle.loads(task)
        result = fn(*args, **kwargs)
    except BaseException as error:  # SystemExit too: it is the task's failure, not the worker's
        return pickle.dumps(("raised", (f"raised {type(error).__name__}: {error}", traceback.format_exc())))
    try:
        return pickle.dumps(("ok", result))
    except Exception as error:
        return pickle.dumps(("raised", (f"returned a result that cannot be pickled: {error!r}", traceback.format_exc())))


def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker stuck in a collective never sees its pipe close, so it also watches its parent.
    while os.getppid() == parent_pid:
        time.sleep(_ORPHAN_POLL_S)
    os._exit(1)
