"""Flat gradient buckets that reduce while backward is still running.

Each parameter's `.grad` is a view into its bucket's flat buffer, so
autograd accumulates straight into the buffer and the reduction needs no
copy. A bucket launches its collective once every parameter in it has its
gradient; buckets launch strictly in index order so every rank issues the
same collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

# Launches the bucket's collective on its flat buffer; returns the async handle.
ReduceFn = Callable[[torch.Tensor], "dist.Work | None"]


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor  # (sum of numels,) the flat gradients
    num_ready: int = 0
    handle: dist.Work | None = None
    launched: bool = False
    views: list[torch.Tensor] = field(default_factory=list)


def plan_buckets(params: Sequence[nn.Parameter], *, bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Group parameters, in the given order, into buckets of about bucket_bytes."""
    groups: list[list[nn.Parameter]] = [[]]
    size = 0
    for param in params:
        if groups[-1] and size + param.numel() * param.element_size() > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append(param)
        size += param.numel() * param.element_size()
    return [group for group in groups if group]


def _make_bucket(params: list[nn.Parameter]) -> Bucket:
    first = params[0]
    buffer = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    bucket = Bucket(params=params, buffer=buffer)
    offset = 0
    for param in params:
        bucket.views.append(buffer[offset : offset + param.numel()].view_as(param))
        offset += param.numel()
    return bucket


class GradBuckets:
    """Flat gradient buffers over `params` with a collective per bucket, overlapping backward.

    Parameters are bucketed in reverse order (roughly the order backward
    produces their gradients). `sync` decides whether the next backward
    launches collectives (False on accumulation micro-batches).
    """

    def __init__(self, params: Sequence[nn.Parameter], *, bucket_bytes: int, reduce_fn: ReduceFn) -> None:
        trainable = [p for p in params if p.requires_grad]
        self.buckets = [_make_bucket(group) for group in plan_buckets(trainable[::-1], bucket_bytes=bucket_bytes)]
        self.reduce_fn = reduce_fn
        self.sync = True
        self.reduced = False
        self._next_launch = 0
        self._bucket_of: dict[nn.Parameter, Bucket] = {}
        self._hooks = []
        for index, bucket in enumerate(self.buckets):
            for param, view in zip(bucket.params, bucket.views, strict=True):
                param.grad = view
                self._bucket_of[param] = bucket
                self._hooks.append(param.register_post_accumulate_grad_hook(self._hook_for(index)))

    def _hook_for(self, index: int) -> Callable[[torch.Tensor], None]:
        def on_grad_ready(_param: torch.Tensor) -> None:
            if not self.sync:
                return
            if self.reduced:
                raise RuntimeError(
                    "gradients were already reduced this step: call optimizer_step() before the next synced "
                    "backward, and pass sync=False on accumulation micro-batches"
                )
            self.buckets[index].num_ready += 1
            self._launch_ready()

        return on_grad_ready

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.num_ready < len(bucket.params):
                return
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        bucket.handle = self.reduce_fn(bucket.buffer)
        bucket.launched = True
        self._next_launch += 1

    def finish(self) -> None:
        """Launch what backward left (unused parameters), wait for every bucket."""
        for bucket in self.buckets[self._next_launch :]:
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.handle = None
        self.reduced = True

    def scale_(self, factor: torch.Tensor | float) -> None:
        for bucket in self.buckets:
            bucket.buffer.mul_(factor)

    def zero_(self) -> None:
        """Zero the buffers and re-arm the buckets for the next step."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.num_ready = 0
            bucket.launched = False
            for param, view in zip(bucket.params, bucket.views, strict=True):
                if param.grad is not view:  # a user's zero_grad(set_to_none=True) dropped the view
                    param.grad = view
        self._next_launch = 0
        self.reduced = False

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for bucket in self.buckets for p in bucket.params]

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
