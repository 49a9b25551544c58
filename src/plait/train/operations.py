"""How a `plait train` run fails, stops and restarts, on each rank.

- A fault (a dead or failed peer, a hang, a non-finite step, an error) ends the rank with exit code 3 and
  one line naming the cause: printed once (by the rank that failed, or the lowest live rank for a peer
  that died without a word), every rank's traceback in out_dir/train.log.
- SIGINT/SIGTERM (Ctrl-C, preemption; torchrun forwards them) finish the step; every rank agrees after
  each step whether to stop (and whether a time-based checkpoint is due), so all save the same step and
  leave together.
- Under torchrun's elastic agent a restarted rank resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm

from plait.checkpoint.io import checkpoint_name
from plait.config import Config
from plait.distributed.job import launched_job_address, remove_job_file, write_job_file
from plait.distributed.launch import FILE_ONLY, get_logger
from plait.distributed.watchdog import Watchdog, WatchdogSettings
from plait.update import NonFiniteError

FAULT_EXIT = 3  # a run-time fault, reported in one line
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def restart_count() -> int:
    """How often torchrun's elastic agent restarted this job's ranks (its variable; 0 without it)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class StopSignals:
    """SIGINT/SIGTERM set a flag the loop reads between steps (the main thread only can install it)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass(frozen=True)
class Verdict:
    """What every rank does after a step, agreed by all."""

    stop: bool
    save: bool  # a time-based checkpoint is due


class Operations:
    """One per rank and run: the watchdog, the stop signals, the per-step agreement and the fault exit."""

    def __init__(self, config: Config, *, comm: Any, device: torch.device) -> None:
        self.train = config.train
        self.out_dir = Path(config.train.out_dir)
        self.device = device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.log = get_logger()
        self.signals = StopSignals()
        self.address = launched_job_address(self.world_size)
        settings = WatchdogSettings(out_dir=self.out_dir, hang_timeout_s=config.train.hang_timeout_s)
        self.watchdog = Watchdog(
            rank=self.rank,
            world_size=self.world_size,
            settings=settings,
            store=self.address.open() if self.address else None,
            entered=lambda: comm.entered,
            on_fault=self._on_watchdog_fault,
        )
        self._last_save = time.monotonic()
        self._failing = threading.Lock()
        self.stopped_by: str | None = None  # set when the run stopped on SIGINT/SIGTERM (on any rank)

    def start(self, step: int) -> None:
        self.signals.install()
        self.watchdog.progress(step, "starting")
        self.watchdog.start()
        if self.rank == 0 and self.address is not None:
            write_job_file(self.out_dir, self.address)

    def progress(self, step: int, phase: str) -> None:
        self.watchdog.progress(step, phase)

    def after_step(self, step: int, *, saved: bool) -> Verdict:
        """Every rank calls this after each step: one tiny all-reduce decides whether all stop or save."""
        self.watchdog.progress(step, "agreeing whether to stop or save")
        if saved:
            self._last_save = time.monotonic()
        every = self.train.checkpoint_every_s
        due = self.rank == 0 and every > 0 and not saved and time.monotonic() - self._last_save >= every
        flags = [float(self.signals.received is not None), float(due)]
        if self.world_size > 1:
            tensor = torch.tensor(flags, device=self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flags = tensor.tolist()
        self.watchdog.progress(step, "training")
        return Verdict(stop=flags[0] > 0, save=flags[1] > 0)

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def end_of_step(
        self,
        step: int,
        *,
        saved: bool,
        save: Callable[[], None],
        wait_for_save: Callable[[], None],
        resumable: bool = True,
    ) -> bool:
        """Every rank agrees whether to stop (SIGINT/SIGTERM on any rank) or save (train.checkpoint_every_s),
        saving step `step` through `save` when due; True when the run stops here, its step saved if
        train.save_on_signal (`stopped_by` then names the signal). `resumable`: the stop line offers
        --resume (a command without it says where the checkpoint is only)."""
        verdict = self.after_step(step, saved=saved)
        if not saved and (verdict.save or (verdict.stop and self.train.save_on_signal)):
            save()
            self.saved()
            saved = True
        if verdict.stop:
            wait_for_save()
            self.stopped_by = self.signals.received or "a signal to another rank"
            checkpoint = self.out_dir / "checkpoints" / checkpoint_name(step) if saved else None
            if self.rank == 0:
                self.log.info(self.stop_line(step, checkpoint, resumable=resumable))
        return verdict.stop

    def stop_line(self, step: int, checkpoint: Path | None, *, resumable: bool = True) -> str:
        received = self.signals.received or "a signal to another rank"
        hint = f"; continue with --resume {checkpoint}" if resumable else ""
        saved = f"saved {checkpoint}{hint}" if checkpoint else "no checkpoint saved"
        return f"stopped by {received} after step {step}; {saved}"

    def close(self) -> None:
        """The run ended normally (or stopped on a signal): tell the peers, drop the job file."""
        self.watchdog.close("done")
        if self.rank == 0 and self.address is not None:
            remove_job_file(self.out_dir, self.address)
        self.signals.restore()

    # Faults.

    def _on_watchdog_fault(self, line: str, console: bool, root_cause: bool) -> None:
        self.fail(line, console=console, root_cause=root_cause)

    def fail(self, line: str, *, console: bool, root_cause: bool) -> NoReturn:
        """Report `line` once (on the console when `console`), tell the peers, and end this process."""
        self._failing.acquire()  # never released: a second reporter waits for the exit below
        try:
            self.log.error(line, extra={FILE_ONLY: True})
            if console:
                tqdm.write(f"plait train: {line}", file=sys.stderr)  # on a line of its own below the progress bar
            self.watchdog.close("failed" if root_cause else "stopped", message=line)
            if self.rank == 0 and self.address is not None:
                remove_job_file(self.out_dir, self.address)
        except Exception as err:  # the store may be gone with the fault: the line is out, exit anyway
            self.log.error(f"while reporting the fault: {type(err).__name__}: {err}", extra={FILE_ONLY: True})
        finally:
            _flush_logs()
            os._exit(FAULT_EXIT)

    def explain(self, err: BaseException, *, step: int) -> None:
        """The main thread's error: end with the cause's one line; returns only for errors the caller reports
        itself (ValueError/TypeError: bad input, exit 2)."""
        self.log.error(f"failed in step {step + 1}", exc_info=err, extra={FILE_ONLY: True})
        if self.watchdog.faulting.is_set():  # the watchdog is reporting (a hang, a dead peer): let it finish
            time.sleep(self.watchdog.settings.answer_wait_s * 2)
        if isinstance(err, NonFiniteError):
            self.fail(str(err), console=self.rank == 0, root_cause=True)
        if _from_a_collective(err):
            cause = self.watchdog.dead_peer(wait_s=self.watchdog.settings.dead_after_s + 2)
            if cause is not None:
                line, reported = cause
                self.fail(line, console=not reported and self._lowest_live(), root_cause=False)
        if isinstance(err, ValueError | TypeError):
            self.watchdog.close("failed", message=f"{type(err).__name__}: {err}")
            return
        line = f"rank {self.rank} failed in step {step + 1}: {type(err).__name__}: {_first_line(err)}"
        self.fail(f"{line} (traceback in {self.out_dir / 'train.log'})", console=True, root_cause=True)

    def _lowest_live(self) -> bool:
        return self.watchdog.prints_peer_faults()


def _from_a_collective(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(word in text for word in ("gloo", "nccl", "connection", "peer"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else "(no message)"


def _flush_logs() -> None:
    for handler in logging.getLogger("plait").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
