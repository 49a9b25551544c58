"""Run a function on N forked ranks joined by a per-test FileStore, with a hang timeout.

Results come back through files; a hang or a crash fails the test with
every rank's stack and stderr.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _worker(fn: Callable[..., Any], rank: int, world_size: int, workdir: str, args: tuple) -> None:
    log = open(Path(workdir, f"rank{rank}.log"), "w")  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 2)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(str(Path(workdir, "store")), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, Path(workdir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc(file=log)
        log.flush()
        os._exit(1)
    log.flush()
    os._exit(0)


def _report(workdir: str, world_size: int) -> str:
    parts = []
    for rank in range(world_size):
        path = Path(workdir, f"rank{rank}.log")
        text = path.read_text() if path.exists() else "(no log)"
        parts.append(f"--- rank {rank} ---\n{text[-4000:]}")
    return "\n".join(parts)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 90.0) -> list[Any]:
    """Call fn(rank, world_size, *args) on world_size forked gloo ranks; return their results."""
    with tempfile.TemporaryDirectory(prefix="plait-ranks-") as workdir:
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, workdir, args)) for r in range(world_size)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        if hung:
            for proc in hung:
                os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(1.0)
            for proc in procs:
                proc.kill()
            raise TimeoutError(f"ranks hung after {timeout_s:.0f} s; stacks:\n{_report(workdir, world_size)}")
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"ranks {failed} failed:\n{_report(workdir, world_size)}")
        return [torch.load(Path(workdir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
