"""Mesh: every process group of a plan, built from one rank grid.

The grid is `pp x dp x cp x tp` with tp varying fastest, so tensor-parallel
peers are neighbours (inside one node), as in Megatron.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait.config import AXES, Plan
from plait.distributed.topology import launched_ranks_per_node


@dataclass(frozen=True)
class AxisInfo:
    rank: int
    size: int
    group: dist.ProcessGroup | None


class Mesh:
    """The process groups of one resolved plan, passed explicitly to every strand.

    With no process group initialised (one plain process) every axis has
    size 1 and no group, and collectives are skipped by the callers.
    `ranks_per_node` (default: torchrun's LOCAL_WORLD_SIZE, else the whole
    world) tells communication accounting which groups cross nodes.
    """

    def __init__(self, plan: Plan, *, device_type: str = "cpu", ranks_per_node: int | None = None) -> None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.plan = plan.resolve(world_size)
        self.world_size = world_size
        self.device_type = device_type
        self.ranks_per_node = ranks_per_node or launched_ranks_per_node(world_size)
        self.device_mesh: DeviceMesh | None = None
        if dist.is_initialized():
            shape = tuple(getattr(self.plan, axis) for axis in AXES)
            self.device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
        self._axes = {axis: self._axis_info(axis) for axis in AXES}

    def _axis_info(self, axis: str) -> AxisInfo:
        if self.device_mesh is None:
            return AxisInfo(rank=0, size=1, group=None)
        return AxisInfo(
            rank=self.device_mesh.get_local_rank(axis),
            size=self.device_mesh.size(self.device_mesh.mesh_dim_names.index(axis)),
            group=self.device_mesh.get_group(axis),
        )

    def size(self, axis: str) -> int:
        return self._axes[axis].size

    def rank(self, axis: str) -> int:
        return self._axes[axis].rank

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The axis's process group, or None when the axis has one rank."""
        info = self._axes[axis]
        return info.group if info.size > 1 else None

    @property
    def global_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def __repr__(self) -> str:
        sizes = ", ".join(f"{axis}={self.size(axis)}" for axis in AXES)
        return f"Mesh({sizes}, rank={self.global_rank})"
