"""Offloaded model states on one rank: bytes per tier (device, host, disk) and bytes moved per step.

With S a unit's shard elements on this rank (its params / dp, tp-split
weights / tp), e the parameter bytes and M the micro-batches, as plait's
offload (`plait.zero.offload`) places and moves them:

- optimizer off the device: fp32 master (4S) + Adam moments (8S) on the
  host or disk; the step runs on the host. disk: 12S read and 12S written
  per step. The new parameter values go where the parameters live: the
  device's shard (e*S host->device) unless they are offloaded too. ZeRO-3
  in 16 bits, whose on-device shard is the master itself, then keeps a
  16-bit shard on the device instead (`off_device` params -e*S: it arrives).
- gradients (at least on the host once the optimizer is): the fp32 shard
  (4S) goes device->host after each micro-batch's reduction under ZeRO-2/3,
  once under ZeRO-1; on disk it is written then (and read back before the
  next micro-batch adds to it), and read twice by the step (norm and update).
- parameters (ZeRO-3): the e*S shard is fetched before each gather, forward
  and backward of every micro-batch (2M per step), and written once after
  the step (fp32 parameters beside an optimizer on disk share its master
  file: no extra write, no extra bytes).

When the update runs (`update_phase`, as `plait.update.Update.arm` decides):
with gradients or optimizer state on disk and nothing needing every gradient
first (no fp16 loss scaling, no pipeline, no sequence-parallel partial
gradients), each unit's final gradients are handled in backward. Without
clipping the unit is updated there (`in-backward`): its optimizer state is
read and written, and its new parameters written, while backward runs; its
last gradients are never written or read. With clipping their norm is taken
there (`norm-in-backward`): they are written once and read once, by the
update after backward. Otherwise (`after`) the step reads them twice.

The device keeps a working set: a third gathered unit (the fetch ahead) and
two staging units of each state kind that crosses to the device; the host
keeps two staging units of each kind on disk (`STAGED_UNITS`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from plait.config import Plan
from plait.planner.activations import FP32
from plait.planner.cluster import Cluster
from plait.planner.memory import ADAM_BYTES
from plait.planner.shape import Unit
from plait.planner.workload import PARAM_BYTES
from plait.zero.offload.placement import (
    STAGED_UNITS,
    UnitBytes,
    UnitTiers,
    explicit_tiers,
    place_by_budget,
    unit_sizes,
)

OPTIMIZER_STATE_BYTES = FP32 + ADAM_BYTES  # master + moments per shard element
AFTER, NORM_IN_BACKWARD, IN_BACKWARD = "after", "norm-in-backward", "in-backward"


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank moves: host->device, device->host, disk reads, disk writes."""

    h2d: float = 0.0
    d2h: float = 0.0
    disk_read: float = 0.0
    disk_write: float = 0.0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def total(self) -> float:
        return self.h2d + self.d2h + self.disk_read + self.disk_write

    def seconds(self, cluster: Cluster) -> float:
        """The slower of the two links, each streaming (a unit ahead) while the other works: PCIe (both
        directions at once) and the node's disk, shared by its ranks."""
        pcie = max(self.h2d, self.d2h) / cluster.host_link
        if not self.disk_read and not self.disk_write:
            return pcie
        if cluster.disk is None:
            raise ValueError("this plan puts state on disk but the cluster has none; give --disk SIZE,READ,WRITE")
        share = cluster.devices_per_node
        disk = (
            self.disk_read * share / cluster.disk.read_bandwidth
            + self.disk_write * share / cluster.disk.write_bandwidth
        )
        return max(pcie, disk)

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class OffloadBytes:
    """One rank's offload: model-state bytes moved off the device, their host and disk bytes (staging
    included), the device's extra working set, traffic per step by phase, and the host optimizer's work.

    `during` overlaps forward and backward; `after` follows backward (the optimizer phase); `first_*`
    is the first unit's fetch of each phase, which nothing hides.
    """

    off_device: dict[str, float]
    host: float
    disk: float
    device_working: float
    during: Traffic
    after: Traffic
    first_during: Traffic
    first_after: Traffic
    host_optimizer_params: float
    host_optimizer_tensors: float
    device_optimizer_fraction: float
    tiers: tuple[UnitTiers, ...]
    update: str = AFTER  # when the host optimizer runs: AFTER backward, or IN_BACKWARD (serially within it)

    @property
    def per_step(self) -> Traffic:
        return self.during + self.after

    def as_dict(self) -> dict[str, object]:
        return {
            "off_device": self.off_device, "host": self.host, "disk": self.disk,
            "device_working": self.device_working, "io_per_step": self.per_step.as_dict(),
            "io_during_backward": self.during.as_dict(), "io_after_backward": self.after.as_dict(),
            "host_optimizer_params": self.host_optimizer_params, "tiers": summarize_tiers(self.tiers),
            "update": self.update,
        }  # fmt: skip


def place(plan: Plan, units: list[Unit]) -> tuple[list[UnitBytes], list[UnitTiers]]:
    """Each unit's sizes on this rank and where its states live, as `plait.zero.offload` places them."""
    sizes = unit_sizes([unit.local(plan.tp) for unit in units], num_shards=plan.dp if plan.zero else 1)
    budget = plan.memory_budget_bytes
    if budget is None:
        return sizes, [explicit_tiers(plan)] * len(sizes)
    param_bytes = PARAM_BYTES[plan.precision]
    return sizes, place_by_budget(sizes, plan=plan, param_bytes=param_bytes, budget=budget)


def summarize_tiers(tiers: tuple[UnitTiers, ...] | list[UnitTiers]) -> dict[str, str]:
    """Each state's tier, or 'mixed' where a memory budget split the units."""
    out = {}
    for state in ("params", "optimizer", "grads"):
        found = {getattr(t, state) for t in tiers}
        out[state] = found.pop() if len(found) == 1 else "mixed"
    return out


def update_phase(plan: Plan, tiers: list[UnitTiers], *, clips: bool) -> str:
    """When the offloaded update runs and what it reads (the module's docstring)."""
    paged = any(t.optimizer == "disk" or t.grads == "disk" for t in tiers)
    partial_grads = plan.sequence_parallel and plan.tp > 1
    if not paged or plan.precision == "fp16" or plan.pp > 1 or partial_grads:
        return AFTER
    return NORM_IN_BACKWARD if clips else IN_BACKWARD


def offload_bytes(plan: Plan, units: list[Unit], *, clips: bool = True) -> OffloadBytes:
    """Bytes per tier and per step of `plan`'s offload on the rank holding `units`; `clips`: the step
    clips the gradient norm."""
    sizes, tiers = place(plan, units)
    phase = update_phase(plan, tiers, clips=clips)
    e = PARAM_BYTES[plan.precision]
    off_device = dict.fromkeys(("params", "master", "grads", "optimizer"), 0.0)
    host = disk = 0.0
    during, after = Traffic(), Traffic()
    for size, tier in zip(sizes, tiers, strict=True):
        moved, placed, (unit_during, unit_after) = _unit(plan, size, tier, e=e, phase=phase)
        off_device = {k: off_device[k] + moved[k] for k in off_device}
        host += placed["host"]
        disk += placed["disk"]
        during, after = during + unit_during, after + unit_after
    largest = max(range(len(sizes)), key=lambda i: sizes[i].shard)
    big, big_tier = sizes[largest], tiers[largest]
    host_staging, device_working = _staging(big, big_tier, e)
    on_host = sum(s.shard for s, t in zip(sizes, tiers, strict=True) if t.optimizer != "device")
    host_tensors = sum(u.num_tensors for u, t in zip(units, tiers, strict=True) if t.optimizer != "device")
    total = sum(s.shard for s in sizes)
    return OffloadBytes(
        off_device=off_device,
        host=host + host_staging,
        disk=disk,
        device_working=device_working,
        during=during,
        after=after,
        first_during=_first_fetch(big, big_tier, e, phase="during"),
        first_after=_first_fetch(big, big_tier, e, phase="after", grads_read=phase != IN_BACKWARD),
        host_optimizer_params=float(on_host),
        host_optimizer_tensors=float(host_tensors),
        device_optimizer_fraction=1 - on_host / total,
        tiers=tuple(tiers),
        update=phase,
    )


def _unit(
    plan: Plan, size: UnitBytes, tier: UnitTiers, *, e: int, phase: str
) -> tuple[dict[str, float], dict[str, float], tuple[Traffic, Traffic]]:
    """(bytes leaving the device per state, bytes per tier, (traffic during, after backward)) of one unit."""
    s, placed = size.shard, {"host": 0.0, "disk": 0.0, "device": 0.0}
    moved = dict.fromkeys(("params", "master", "grads", "optimizer"), 0.0)
    # fp32 parameters beside the optimizer on the same tier are its master shard (plait.zero.unit)
    shares_master = tier.params == tier.optimizer != "device" and e == FP32
    if tier.params != "device":
        moved["params"] = e * s
        placed[tier.params] += 0.0 if shares_master else e * s
    if tier.optimizer != "device":
        moved["optimizer"] = ADAM_BYTES * s
        moved["master"] = FP32 * s if e != FP32 else 0.0  # fp32: the parameters are the master on the device
        if plan.zero == 3 and e != FP32 and tier.params == "device":  # a 16-bit shard stays for the gathers
            moved["params"] = -e * s
        placed[tier.optimizer] += OPTIMIZER_STATE_BYTES * s
    if tier.grads != "device":
        moved["grads"] = FP32 * s if (plan.zero >= 2 or e != FP32) else 0.0  # fp32 ZeRO-1: a view of the full grads
        placed[tier.grads] += FP32 * s
    return moved, placed, _unit_traffic(plan, s, tier, e=e, phase=phase)


def _unit_traffic(plan: Plan, s: int, tier: UnitTiers, *, e: int, phase: str) -> tuple[Traffic, Traffic]:
    m, during, after = plan.microbatches, Traffic(), Traffic()
    if tier.params != "device":  # fetched before the forward and the backward gather of each micro-batch
        reads = 2 * m * e * s
        during += Traffic(h2d=reads, disk_read=reads if tier.params == "disk" else 0.0)
    if tier.grads != "device":
        during, after = _grad_traffic(plan, FP32 * s, tier=tier, phase=phase, moved=(during, after))
    update = _new_params(s, tier, e)
    if tier.optimizer == "disk":
        update += Traffic(disk_read=OPTIMIZER_STATE_BYTES * s, disk_write=OPTIMIZER_STATE_BYTES * s)
    if phase == IN_BACKWARD:
        return during + update, after
    return during, after + update


def _grad_traffic(
    plan: Plan, g: float, *, tier: UnitTiers, phase: str, moved: tuple[Traffic, Traffic]
) -> tuple[Traffic, Traffic]:
    """A gradient shard of `g` bytes off the device: to the host after each micro-batch's reduction under
    ZeRO-2/3 (once under ZeRO-1, after backward unless the update takes it in backward); on disk written
    there and read back before the next micro-batch adds to it; the step reads the last one as its
    phase says (module docstring)."""
    during, after = moved
    m, disk = plan.microbatches, tier.grads == "disk"
    writes = m if plan.zero >= 2 else 1  # reductions whose result leaves the device
    last_kept = phase == IN_BACKWARD  # the last reduction's result is used in memory, then dropped
    written = (writes - 1 if last_kept else writes) * g if disk else 0.0
    moves = Traffic(d2h=writes * g, disk_write=written, disk_read=(writes - 1) * g if disk else 0.0)
    if plan.zero >= 2 or phase != AFTER:
        during += moves
    else:
        after += moves
    if disk:
        after += Traffic(disk_read={AFTER: 2 * g, NORM_IN_BACKWARD: g, IN_BACKWARD: 0.0}[phase])
    return during, after


def _new_params(s: int, tier: UnitTiers, e: int) -> Traffic:
    """The updated parameter shard, from where the optimizer stepped to where the parameters live."""
    on_host = tier.optimizer != "device"
    write = e * s if tier.params == "disk" and not (tier.optimizer == "disk" and e == FP32) else 0.0
    if tier.params == "device":
        return Traffic(h2d=e * s) if on_host else Traffic()
    return Traffic(d2h=0.0 if on_host else e * s, disk_write=write)


def _staging(big: UnitBytes, tier: UnitTiers, e: int) -> tuple[float, float]:
    """(host, device) staging bytes: two units of each kind on disk pass through host memory; two units
    of parameters and of gradient shards that cross PCIe wait on the device, plus under ZeRO-3 a third
    gathered unit (the one fetched ahead)."""
    s = big.shard
    host = 0.0
    if tier.params == "disk":
        host += STAGED_UNITS * e * s
    if tier.optimizer == "disk":
        host += STAGED_UNITS * OPTIMIZER_STATE_BYTES * s
    if tier.grads == "disk":
        host += STAGED_UNITS * FP32 * s
    device = 0.0
    if tier.params != "device":
        device += STAGED_UNITS * e * s + e * big.full
    if tier.grads != "device":
        device += STAGED_UNITS * FP32 * s
    return host, device


def _first_fetch(big: UnitBytes, tier: UnitTiers, e: int, *, phase: str, grads_read: bool = True) -> Traffic:
    """The largest unit's first fetch of a phase: its parameter shard before the first gather, its
    optimizer state (and gradient shard, unless the update finds it in memory) on disk before the first
    update."""
    s = big.shard
    if phase == "during":
        if tier.params == "device":
            return Traffic()
        return Traffic(h2d=e * s, disk_read=e * s if tier.params == "disk" else 0.0)
    read = (OPTIMIZER_STATE_BYTES * s if tier.optimizer == "disk" else 0.0) + (
        FP32 * s if tier.grads == "disk" and grads_read else 0.0
    )
    return Traffic(disk_read=read)
