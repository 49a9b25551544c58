"""Process-group start-up, rank-aware logging and the torchrun wrapper."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
        dist.init_process_group(backend=backend_for(device_type), timeout=timedelta(seconds=timeout_s))
    return device


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = dist.get_rank() if dist.is_initialized() else 0
        return True


def get_logger(name: str = "plait", *, all_ranks: bool = False) -> logging.Logger:
    """A logger that prefixes the rank; by default only rank 0 prints INFO."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[rank %(rank)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if all_ranks or is_main_rank() else logging.WARNING)
    return logger


def torchrun(args: Sequence[str]) -> int:
    """Run torchrun with `args` passed through (single or multi-node flags)."""
    from torch.distributed.run import get_args_parser, run

    parsed = get_args_parser().parse_args(list(args))
    try:
        run(parsed)
    except Exception as err:  # torchrun raises ChildFailedError with its own report
        print(f"plait run: {err}", file=sys.stderr)
        return 1
    return 0
