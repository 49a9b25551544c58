"""Collective helpers: byte counting for every collective plait issues."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist


class CommCounter:
    """Bytes each collective puts on this rank's wire, per kind, since the last reset.

    The count is the payload (elements x element size), the figure the ZeRO
    paper's formulas use; the ring algorithms' wire traffic is a further
    2(N-1)/N of it for all-reduce and (N-1)/N for gathers and scatters.
    """

    def __init__(self) -> None:
        self.bytes_by_kind: Counter[str] = Counter()

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        self.bytes_by_kind[kind] += tensor.numel() * tensor.element_size()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())

    def reset(self) -> None:
        self.bytes_by_kind.clear()


def all_reduce(
    tensor: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    counter: CommCounter | None = None,
    async_op: bool = False,
) -> dist.Work | None:
    """Sum-all-reduce in place over `group`; a no-op when the group is None (one rank)."""
    if group is None:
        return None
    if counter is not None:
        counter.add("all_reduce", tensor)
    return dist.all_reduce(tensor, group=group, async_op=async_op)
