"""An offloading plan's estimate from the same plan's on-device one: states leave the device for the host
or disk, staging joins the working set, and the step gains the I/O that compute does not hide.

Time: forward and backward stream each unit's offloaded state a unit ahead,
so their I/O costs max(0, io - compute) plus the first unit's fetch; the
optimizer runs on the host at `host_adam_rate` plus a fixed cost per tensor
(as on the device): after backward, its disk I/O streaming beside it
(max(host step, io) plus the first unit's read), or, where the update runs
in backward (`plait.planner.offload.update_phase`), a unit at a time inside
it, its I/O hidden behind forward, backward and the host step together.
"""

from __future__ import annotations

import dataclasses

from plait.config import Plan
from plait.planner.cluster import Cluster
from plait.planner.memory import MemoryBreakdown
from plait.planner.offload import IN_BACKWARD, OffloadBytes, offload_bytes
from plait.planner.shape import Unit
from plait.planner.timing import OPTIMIZER_OPS_PER_TENSOR, TimeBreakdown


def offload_memory(memory: MemoryBreakdown, offload: OffloadBytes) -> MemoryBreakdown:
    """`memory` with the offloaded states moved off the device and the staging added to its working set."""
    moved = offload.off_device
    return dataclasses.replace(
        memory,
        params=max(0.0, memory.params - moved["params"]),
        master=max(0.0, memory.master - moved["master"]),
        grads=max(0.0, memory.grads - moved["grads"]),
        optimizer=max(0.0, memory.optimizer - moved["optimizer"]),
        working=memory.working + offload.device_working,
        host=offload.host,
        disk=offload.disk,
    )


def offload_time(time: TimeBreakdown, offload: OffloadBytes, *, cluster: Cluster) -> TimeBreakdown:
    """`time` with the host optimizer for the states it steps there and the I/O compute does not hide."""
    span = time.compute + time.tp_comm + time.bubble + time.pp_comm
    host_step = offload.host_optimizer_params / cluster.host_adam_rate
    host_step += offload.host_optimizer_tensors * OPTIMIZER_OPS_PER_TENSOR * cluster.op_overhead
    during, after = offload.during.seconds(cluster), offload.after.seconds(cluster)
    in_backward = offload.update == IN_BACKWARD  # the host step runs within backward, the I/O beside both
    exposed = max(0.0, during - span - (host_step if in_backward else 0.0)) + offload.first_during.seconds(cluster)
    exposed += max(0.0, after - (0.0 if in_backward else host_step)) + offload.first_after.seconds(cluster)
    return dataclasses.replace(
        time,
        optimizer=time.optimizer * offload.device_optimizer_fraction + host_step,
        offload_io=exposed,
        io=during + after,
    )


def fits(memory: MemoryBreakdown, cluster: Cluster) -> bool:
    """Device, host (per node, shared by its ranks) and disk all hold what the plan puts there. On a CPU
    cluster host memory is device memory: both count against it."""
    ranks = cluster.devices_per_node
    if cluster.host_is_device:
        in_memory = memory.total + memory.host <= cluster.device_memory
    else:
        in_memory = memory.total <= cluster.device_memory and memory.host * ranks <= cluster.host_memory
    on_disk = memory.disk == 0 or (cluster.disk is not None and memory.disk * ranks <= cluster.disk.capacity)
    return in_memory and on_disk


def apply_offload(
    plan: Plan,
    memory: MemoryBreakdown,
    time: TimeBreakdown,
    *,
    units: list[Unit],
    cluster: Cluster,
    clips: bool = True,
) -> tuple[MemoryBreakdown, TimeBreakdown, OffloadBytes]:
    """The offloading plan's memory and time from its on-device estimate, on the rank holding `units`;
    `clips`: the step clips the gradient norm."""
    offload = offload_bytes(plan, units, clips=clips)
    return offload_memory(memory, offload), offload_time(time, offload, cluster=cluster), offload
