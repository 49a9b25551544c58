"""Mesh: every process group of a plan, built from one rank grid.

The grid is `pp x dp x cp x tp` with tp varying fastest, so tensor-parallel
peers are neighbours (inside one node), as in Megatron.

Expert parallel is carved from dp: each dp group splits into dp/ep groups of ep
contiguous dp ranks (`ep`, the ranks that split the experts between them, so ep
peers are neighbours) and ep groups of dp/ep ranks with the same ep rank (`edp`,
expert data parallel: the replicas of one set of experts, whose gradients they sum).

Context parallel splits each sequence over cp ranks that hold replicas of the weights, so for
the weights they are data-parallel ranks: with cp > 1 the `dp` axis spans dp x cp (rank
dp_rank * cp + cp_rank), and every reduction and ZeRO shard that reads `dp` covers the cp ranks.
`data` is the plain dp axis: which shard of the global batch a rank feeds (cp peers share it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait.config import AXES, Plan
from plait.distributed.launch import get_logger, is_main_rank
from plait.distributed.precision import AUTO, agree_on_precision, resolve_precision
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
        # plan.precision="auto" becomes bf16 or fp32 here, by this machine (plait.distributed.precision), the same on every rank
        precision = resolve_precision(plan.precision, device_type=device_type)
        self.precision = agree_on_precision(precision, device_type=device_type)
        self.plan = dataclasses.replace(plan.resolve(world_size), precision=self.precision.precision)
        if self.precision.requested == AUTO and is_main_rank():
            get_logger().info(self.precision.line())
        self.world_size = world_size
        self.device_type = device_type
        self.ranks_per_node = ranks_per_node or launched_ranks_per_node(world_size)
        self.device_mesh: DeviceMesh | None = None
        zero_shard = self.plan.zero_shard_size(self.ranks_per_node)  # raises before any collective
        if dist.is_initialized():
            shape = tuple(getattr(self.plan, axis) for axis in AXES)
            self.device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
        self._axes = {axis: self._axis_info(axis) for axis in AXES}
        self._axes.update(self._fold_context())
        self._axes.update(self._expert_axes())
        self._axes.update(self._zero_shard_axes(zero_shard))

    def _axis_info(self, axis: str) -> AxisInfo:
        if self.device_mesh is None:
            return AxisInfo(rank=0, size=1, group=None)
        return AxisInfo(
            rank=self.device_mesh.get_local_rank(axis),
            size=self.device_mesh.size(self.device_mesh.mesh_dim_names.index(axis)),
            group=self.device_mesh.get_group(axis),
        )

    def _fold_context(self) -> dict[str, AxisInfo]:
        """`data` (the plain dp axis) and, with cp > 1, `dp` spanning dp x cp (module docstring)."""
        data = self._axes["dp"]
        if self.plan.cp == 1 or self.device_mesh is None:
            return {"data": data}
        folded = None
        for line in _dp_lines(self.device_mesh):  # new_group is collective: every rank makes every group
            group = dist.new_group(line)
            if self.global_rank in line:
                folded = AxisInfo(rank=line.index(self.global_rank), size=len(line), group=group)
        assert folded is not None
        return {"data": data, "dp": folded}

    def _expert_axes(self) -> dict[str, AxisInfo]:
        """`ep` and `edp` (module docstring); with ep=1, ep is one rank and edp is dp itself."""
        ep_axis, edp_axis = self._carve_dp(self.plan.ep)
        return {"ep": ep_axis, "edp": edp_axis}

    def _zero_shard_axes(self, size: int) -> dict[str, AxisInfo]:
        """`zshard` and `zrep` (module docstring); without hybrid sharding zshard is dp and zrep one rank."""
        if size == self._axes["dp"].size:
            return {"zshard": self._axes["dp"], "zrep": AxisInfo(rank=0, size=1, group=None)}
        shard_axis, replica_axis = self._carve_dp(size)
        return {"zshard": shard_axis, "zrep": replica_axis}

    def _carve_dp(self, block: int) -> tuple[AxisInfo, AxisInfo]:
        """Split each dp group into groups of `block` neighbouring dp ranks, and groups of the ranks at
        the same offset in every block; block=1 leaves one rank and dp itself."""
        dp = self._axes["dp"]
        if block == 1 or self.device_mesh is None:
            return AxisInfo(rank=0, size=1, group=None), dp
        dp_rank = dp.rank
        inner = across = None
        # Every rank creates every group, in the same order (new_group is collective over the world).
        for line in _dp_lines(self.device_mesh):
            for start in range(0, len(line), block):
                group = dist.new_group(line[start : start + block])
                if self.global_rank in line[start : start + block]:
                    inner = AxisInfo(rank=dp_rank % block, size=block, group=group)
            for offset in range(block):
                members = line[offset::block]
                group = dist.new_group(members) if len(members) > 1 else None
                if self.global_rank in members:
                    across = AxisInfo(rank=dp_rank // block, size=len(members), group=group)
        assert inner is not None and across is not None
        return inner, across

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

    def ranks(self, axis: str) -> list[int]:
        """The global ranks of this rank's group along `axis`, in axis-rank order."""
        group = self.group(axis)
        return dist.get_process_group_ranks(group) if group is not None else [self.global_rank]

    def __repr__(self) -> str:
        shown = (*AXES, "ep") if self.size("ep") > 1 else AXES
        sizes = ", ".join(f"{axis}={self.size(axis)}" for axis in shown)
        return f"Mesh({sizes}, rank={self.global_rank})"


def _dp_lines(device_mesh: DeviceMesh) -> list[list[int]]:
    """The global ranks of every (dp x cp) group, each in dp-rank order (cp varying fastest)."""
    grid = device_mesh.mesh  # (pp, dp, cp, tp)
    lines = grid.permute(0, 3, 1, 2).reshape(-1, grid.shape[1] * grid.shape[2])
    return [line.tolist() for line in lines]
