"""Process-group start-up, rank-aware logging and the torchrun wrapper."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rank_device() -> torch.device:
    """This rank's device once `init_distributed` ran: its CUDA device where CUDA is available, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(*, device_type: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...).

    Returns this rank's device. Without torchrun's variables it returns the
    device and leaves the process as one plain rank.
    """
    device_type = device_type or default_device_type()
    device = torch.device(device_type)
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend_for(device_type), timeout=timeout)
        else:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(
                backend=backend_for(device_type), store=store, rank=rank, world_size=world_size, timeout=timeout
            )
    return device


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """Under torchrun's agent store, this attempt's own keys. torchrun hands every restart the same store,
    whose keys from the failed attempt (gloo's peer addresses) a rank that starts late would read: it then
    connects to a dead peer ("Connection refused"). None outside torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"plait-attempt-{attempt}", store)


def join_launched_group(device_type: str) -> bool:
    """Join torchrun's process group if torchrun started this process (WORLD_SIZE, RANK, MASTER_ADDR
    are its contract) and nothing has joined one yet; True when it joined. A plain process is left alone."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return False
    init_distributed(device_type=device_type)
    return True


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# Pass extra={FILE_ONLY: True} for a line the console already shows another way (a progress bar's write).
FILE_ONLY = "file_only"


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = dist.get_rank() if dist.is_initialized() else 0
        return True


class _ConsoleFilter(_RankFilter):
    def filter(self, record: logging.LogRecord) -> bool:
        return super().filter(record) and not getattr(record, FILE_ONLY, False)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record arrives, not the stream of the first call: a
    program (or pytest's capture) that swaps or closes stderr between runs in one process must not
    leave plait writing into a closed file."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _console_handler(logger: logging.Logger) -> logging.Handler:
    for handler in logger.handlers:
        if any(isinstance(f, _ConsoleFilter) for f in handler.filters):
            return handler
    handler = _CurrentStderr()
    handler.addFilter(_ConsoleFilter())
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    return handler


def get_logger(name: str = "plait", *, all_ranks: bool = False) -> logging.Logger:
    """A logger that prefixes the rank; on the console by default only rank 0 prints INFO
    (a `log_file` gets every rank's INFO)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    _console_handler(logger).setLevel(logging.INFO if all_ranks or is_main_rank() else logging.WARNING)
    return logger


@contextlib.contextmanager
def log_file(path: Path, *, name: str = "plait") -> Iterator[Path]:
    """Append the logger's records to `path`, timestamped and rank-prefixed, while the block runs;
    an exception leaving the block is written there too. Every rank may share one file: each
    record is one append, so lines from different ranks never mix."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    logger = get_logger(name)  # INFO from every rank reaches the file; the console keeps its own level
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(message)s"))
    logger.addHandler(handler)
    try:
        yield Path(path)
    except BaseException:
        logger.error("failed", exc_info=True, extra={FILE_ONLY: True})
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()


def torchrun(args: Sequence[str]) -> int:
    """Run torchrun with `args` passed through (single or multi-node flags)."""
    from plait.distributed.agent import run_agent

    return run_agent(args)  # a failed rank in one line; 3 when a plait rank reported its own fault
