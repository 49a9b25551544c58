"""Collective helpers: byte counting for every collective plait issues."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist


class CommCounter:
    """Bytes of collective traffic per kind since the last reset, counted as the ZeRO paper does.

    A reduce-scatter or an all-gather of a P-element buffer counts P elements;
    an all-reduce counts 2P (it is a reduce-scatter plus an all-gather). So
    per step with one micro-batch DDP and ZeRO-1 move 2P, ZeRO-3 3P. What a
    ring puts on the wire is a further (N-1)/N of these figures.
    """

    def __init__(self) -> None:
        self.bytes_by_kind: Counter[str] = Counter()

    def add(self, kind: str, tensor: torch.Tensor, *, factor: int = 1) -> None:
        self.bytes_by_kind[kind] += factor * tensor.numel() * tensor.element_size()

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
        counter.add("all_reduce", tensor, factor=2)
    return dist.all_reduce(tensor, group=group, async_op=async_op)
