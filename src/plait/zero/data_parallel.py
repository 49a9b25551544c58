"""plait's data parallel: replicas kept equal by bucketed, overlapped gradient sums."""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.comm import CommCounter, all_reduce
from plait.distributed.mesh import Mesh
from plait.zero.buckets import GradBuckets, ReduceFn


def broadcast_module_state(module: nn.Module, *, mesh: Mesh, expert_params: Collection[nn.Parameter] = ()) -> None:
    """Copy dp rank 0's parameters and buffers to every dp rank, so replicas start equal;
    `expert_params` (expert parallel) go from edp rank 0 to the replicas of the same experts."""
    experts = {id(p) for p in expert_params}
    tensors = [*module.parameters(), *module.buffers()]
    _broadcast([t for t in tensors if id(t) not in experts], group=mesh.group("dp"))
    _broadcast([t for t in tensors if id(t) in experts], group=mesh.group("edp"))


def _broadcast(tensors: list[torch.Tensor], *, group: dist.ProcessGroup | None) -> None:
    if group is None:
        return
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=source, group=group)


class DataParallel:
    """Gradient buckets whose collective is a sum over the dp axis (expert-parallel parameters:
    their own buckets, summed over edp, the ranks holding the same experts).

    Gradients stay summed (not averaged) until `scale_`, because the right
    divisor (the global token count) is known only after the last micro-batch.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mesh: Mesh,
        bucket_mb: float,
        counter: CommCounter,
        expert_params: Collection[nn.Parameter] = (),
    ) -> None:
        self.mesh = mesh
        self.model = model
        self.sync = True
        self.group = mesh.group("dp")
        self.counter = counter
        broadcast_module_state(model, mesh=mesh, expert_params=expert_params)
        experts = {id(p) for p in expert_params}
        params = list(model.parameters())
        bucket_bytes = int(bucket_mb * 2**20)
        self.bucket_sets = [
            GradBuckets([p for p in params if id(p) not in experts], bucket_bytes=bucket_bytes, reduce_fn=self._reduce),
        ]
        if experts:
            expert_reduce = self._reducer(mesh.group("edp"))
            self.bucket_sets.append(
                GradBuckets([p for p in params if id(p) in experts], bucket_bytes=bucket_bytes, reduce_fn=expert_reduce)
            )

    def _reduce(self, buffer: torch.Tensor) -> dist.Work | None:
        return all_reduce(buffer, group=self.group, counter=self.counter, async_op=True)

    def _reducer(self, group: dist.ProcessGroup | None) -> ReduceFn:
        def reduce(buffer: torch.Tensor) -> dist.Work | None:
            return all_reduce(buffer, group=group, counter=self.counter, async_op=True)

        return reduce

    @property
    def buckets(self) -> GradBuckets:
        """The dense parameters' buckets (summed over dp)."""
        return self.bucket_sets[0]

    @property
    def optimizer_params(self) -> list[nn.Parameter]:
        return [p for buckets in self.bucket_sets for p in buckets.params]

    def held_tensors(self) -> list[torch.Tensor]:
        return []

    def named_grads(self) -> list[tuple[str, torch.Tensor | None]]:
        return [(name, p.grad) for name, p in self.model.named_parameters()]

    def before_backward(self, *, sync: bool) -> None:
        for buckets in self.bucket_sets:
            buckets.sync = sync
        self.sync = sync

    def after_backward(self) -> None:
        if self.sync:
            for buckets in self.bucket_sets:
                buckets.finish()

    def scale_(self, factor: torch.Tensor | float) -> None:
        for buckets in self.bucket_sets:
            buckets.scale_(factor)

    def after_step(self) -> None:
        """Replicas stepped identically: nothing to publish."""

    def zero_(self) -> None:
        for buckets in self.bucket_sets:
            buckets.zero_()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in self.model.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load this model's entries of `state` (a pipeline stage holds only some of them)."""
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(
                f"the state lacks {len(missing)} parameters, e.g. {missing[:3]}; load a checkpoint of this model"
            )
        self.model.load_state_dict({name: state[name] for name in own})
