"""Run a function on N forked gloo ranks joined by a FileStore, with a hang timeout.

For tests and benchmarks on one machine: forking costs milliseconds where
spawning a Python per rank costs seconds. Results come back through pickle
files. On a hang every rank dumps its stacks (SIGUSR1) and is killed; a hang
or a crash raises with every rank's stderr when it was captured.

    results = run_forked(fn, 4, arg)   # fn(rank, world_size, arg) on each rank
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _worker(
    fn: Callable[..., Any], rank: int, world_size: int, workdir: str, options: tuple[int, bool], args: tuple
) -> None:
    num_threads, capture = options
    if capture:
        log = open(Path(workdir, f"rank{rank}.log"), "w")  # noqa: SIM115 - lives as long as the process
        os.dup2(log.fileno(), 2)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    torch.set_num_threads(num_threads)
    try:
        store = dist.FileStore(str(Path(workdir, "store")), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        with open(Path(workdir, f"rank{rank}.pkl"), "wb") as out:
            pickle.dump(result, out)
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _report(workdir: str, world_size: int, *, capture: bool) -> str:
    if not capture:
        return "(stacks and tracebacks above)"
    parts = []
    for rank in range(world_size):
        path = Path(workdir, f"rank{rank}.log")
        text = path.read_text() if path.exists() else "(no log)"
        parts.append(f"--- rank {rank} ---\n{text[-4000:]}")
    return "\n".join(parts)


def _join_all(procs: list[Any], *, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
    return [proc for proc in procs if proc.is_alive()]


def run_forked(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    num_threads: int = 1,
    timeout_s: float = 90.0,
    capture: bool = True,
    workdir: str | None = None,
) -> list[Any]:
    """Call fn(rank, world_size, *args) on `world_size` forked gloo ranks; return their results.

    Fork before this process runs torch thread pools. `capture`: each rank's
    stderr goes to a log file that errors quote (tests); off, it stays on the
    terminal (benchmarks). `workdir`: where the store and results live (a
    fresh temporary directory by default).
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="plait-ranks-") as fresh:
            return run_forked(
                fn, world_size, *args, num_threads=num_threads, timeout_s=timeout_s, capture=capture, workdir=fresh
            )
    ctx = mp.get_context("fork")
    options = (num_threads, capture)
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, workdir, options, args)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    hung = _join_all(procs, timeout_s=timeout_s)
    if hung:
        for proc in hung:
            os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(1.0)
        for proc in procs:
            proc.kill()
        raise TimeoutError(
            f"ranks hung after {timeout_s:.0f} s; stacks:\n{_report(workdir, world_size, capture=capture)}"
        )
    failed = [rank for rank, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"ranks {failed} failed:\n{_report(workdir, world_size, capture=capture)}")
    results = []
    for rank in range(world_size):
        with open(Path(workdir, f"rank{rank}.pkl"), "rb") as result:
            results.append(pickle.load(result))
    return results
