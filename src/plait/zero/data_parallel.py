"""plait's data parallel: replicas kept equal by bucketed, overlapped gradient sums."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.comm import CommCounter, all_reduce
from plait.distributed.mesh import Mesh
from plait.zero.buckets import GradBuckets


def broadcast_module_state(module: nn.Module, *, mesh: Mesh) -> None:
    """Copy dp rank 0's parameters and buffers to every dp rank, so replicas start equal."""
    group = mesh.group("dp")
    if group is None:
        return
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=source, group=group)


class DataParallel:
    """Gradient buckets whose collective is a sum over the dp axis.

    Gradients stay summed (not averaged) until `scale_`, because the right
    divisor (the global token count) is known only after the last micro-batch.
    """

    def __init__(self, model: nn.Module, *, mesh: Mesh, bucket_mb: float, counter: CommCounter) -> None:
        self.mesh = mesh
        self.model = model
        self.sync = True
        self.group = mesh.group("dp")
        self.counter = counter
        broadcast_module_state(model, mesh=mesh)
        self.buckets = GradBuckets(
            list(model.parameters()), bucket_bytes=int(bucket_mb * 2**20), reduce_fn=self._reduce
        )

    def _reduce(self, buffer: torch.Tensor) -> dist.Work | None:
        return all_reduce(buffer, group=self.group, counter=self.counter, async_op=True)

    @property
    def optimizer_params(self) -> list[nn.Parameter]:
        return self.buckets.params

    def held_tensors(self) -> list[torch.Tensor]:
        return []

    def named_grads(self) -> list[tuple[str, torch.Tensor | None]]:
        return [(name, p.grad) for name, p in self.model.named_parameters()]

    def before_backward(self, *, sync: bool) -> None:
        self.buckets.sync = sync
        self.sync = sync

    def after_backward(self) -> None:
        if self.sync:
            self.buckets.finish()

    def scale_(self, factor: torch.Tensor | float) -> None:
        self.buckets.scale_(factor)

    def after_step(self) -> None:
        """Replicas stepped identically: nothing to publish."""

    def zero_(self) -> None:
        self.buckets.zero_()

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
