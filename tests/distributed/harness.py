"""The multi-process test tier's launcher: plait.distributed.forked with each rank's stderr captured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plait.distributed.forked import run_forked


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 90.0) -> list[Any]:
    """Call fn(rank, world_size, *args) on world_size forked gloo ranks; return their results."""
    return run_forked(fn, world_size, *args, timeout_s=timeout_s, capture=True)
