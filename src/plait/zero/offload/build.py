"""Decide where each unit's states live and check the disk, before any collective."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.distributed as dist

from plait.amp.policy import PrecisionPolicy
from plait.config import Plan
from plait.distributed.mesh import Mesh
from plait.sizes import format_bytes
from plait.zero.offload.disk import DiskStore, check_offload_dir
from plait.zero.offload.manager import Offload
from plait.zero.offload.placement import (
    BudgetPlacement,
    UnitBytes,
    UnitTiers,
    explicit_tiers,
    place_by_budget,
    unit_sizes,
)

DISK_HEADROOM = 1.05  # files are padded to 4 KiB per tensor; leave a little more than the exact bytes


@dataclass(frozen=True)
class OffloadPlan:
    """Where each unit's states go on one rank, what that puts on disk, and notes for the log."""

    tiers: list[UnitTiers]
    sizes: list[UnitBytes]
    disk_bytes: int
    direct_io: bool
    notes: list[str]


def plan_offload(
    numels: list[int], *, plan: Plan, num_shards: int, param_bytes: int, ranks_per_node: int
) -> OffloadPlan:
    """Place the states and check the disk for them: ValueError for a budget below the working set or a
    directory that is missing, unwritable or too small (before any rank starts or any collective)."""
    sizes = unit_sizes(numels, num_shards=num_shards)
    budget = plan.memory_budget_bytes
    if budget is not None:
        tiers = place_by_budget(sizes, plan=plan, param_bytes=param_bytes, budget=budget)
    else:
        tiers = [explicit_tiers(plan)] * len(sizes)
    notes = [describe_placement(tiers, sizes, param_bytes=param_bytes)]
    disk = disk_bytes(tiers, sizes, param_bytes=param_bytes)
    note = ""
    if disk:
        note = check_offload_dir(plan.offload_dir, needed_bytes=int(disk * ranks_per_node * DISK_HEADROOM))
    return OffloadPlan(tiers=tiers, sizes=sizes, disk_bytes=disk, direct_io=not note, notes=notes + [note] * bool(note))


def build_offload(numels: list[int], *, mesh: Mesh, policy: PrecisionPolicy) -> Offload:
    """This rank's offload for units of `numels` elements each (see `plan_offload`)."""
    plan = mesh.plan
    param_bytes = policy.param_dtype.itemsize
    placed = plan_offload(
        numels, plan=plan, num_shards=mesh.size("dp"), param_bytes=param_bytes, ranks_per_node=mesh.ranks_per_node
    )
    store = None
    if placed.disk_bytes:
        rank = dist.get_rank() if dist.is_initialized() else 0
        store = DiskStore(plan.offload_dir, rank=rank, direct=placed.direct_io)
    offload = Offload(placed.tiers, store=store, notes=placed.notes)
    budget = plan.memory_budget_bytes
    if budget is not None and store is not None:
        offload.placement = BudgetPlacement(sizes=placed.sizes, plan=plan, param_bytes=param_bytes, budget=budget)
    return offload


def disk_bytes(tiers: list[UnitTiers], sizes: list[UnitBytes], *, param_bytes: int) -> int:
    """Bytes this rank writes to disk: parameter shards, master + optimizer state, gradient shards."""
    total = 0
    for tier, size in zip(tiers, sizes, strict=True):
        if tier.params == "disk" and not (tier.optimizer == "disk" and param_bytes == 4):
            total += size.state_bytes("params", param_bytes=param_bytes)
        if tier.optimizer == "disk":
            total += size.state_bytes("master", param_bytes=param_bytes)
            total += size.state_bytes("moments", param_bytes=param_bytes)
        if tier.grads == "disk":
            total += size.state_bytes("grads", param_bytes=param_bytes)
    return total


def describe_placement(tiers: list[UnitTiers], sizes: list[UnitBytes], *, param_bytes: int) -> str:
    """One log line: how many units keep each state where, and the bytes on disk."""
    parts = []
    for field in ("params", "optimizer", "grads"):
        counts = Counter(getattr(t, field) for t in tiers)
        parts.append(f"{field} " + ", ".join(f"{n} units {where}" for where, n in sorted(counts.items())))
    disk = format_bytes(disk_bytes(tiers, sizes, param_bytes=param_bytes))
    return f"offload: {'; '.join(parts)}; {disk} on disk per rank"
