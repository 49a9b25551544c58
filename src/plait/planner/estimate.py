"""One plan's estimate: its memory breakdown, its step time, and the throughput they imply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from plait.config import Plan
from plait.planner.cluster import Cluster
from plait.planner.layout import LayoutCache, ScheduleCache
from plait.planner.memory import MemoryBreakdown, MemoryModel, with_zero_shard
from plait.planner.offload import OffloadBytes, summarize_tiers
from plait.planner.offload_apply import apply_offload, fits
from plait.planner.shape import ModelShape
from plait.planner.timing import TimeBreakdown, TimeModel
from plait.planner.workload import Workload
from plait.train.metrics import mfu


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    memory: MemoryBreakdown
    time: TimeBreakdown
    tokens_per_s: float
    mfu: float
    fits: bool
    offload: OffloadBytes | None = None

    @property
    def step_s(self) -> float:
        return self.time.total

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": describe(self.plan),
            "memory": self.memory.as_dict(),
            "time": self.time.as_dict(),
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "fits": self.fits,
        } | ({"offload": self.offload.as_dict()} if self.offload else {})


def describe(plan: Plan) -> str:
    """A short name for a plan: the degrees and switches that differ from the defaults."""
    parts = [f"dp{plan.dp}", f"tp{plan.tp}", f"pp{plan.pp}"] + ([f"ep{plan.ep}"] if plan.ep > 1 else [])
    parts += ([f"cp{plan.cp}"] if plan.cp > 1 else []) + [f"z{plan.zero}", plan.precision, f"m{plan.microbatches}"]
    if plan.zero == 3 and plan.zero3_gather != "auto":
        parts.append(f"gather-{plan.zero3_gather}")
    if plan.zero_shard != "all":
        parts.append(f"shard{plan.zero_shard}")
    if plan.sequence_parallel:
        parts.append("sp")
    if plan.pp > 1:
        parts.append(plan.pp_schedule + (f"x{plan.pp_chunks}" if plan.pp_chunks > 1 else ""))
    if plan.recompute != "none":
        ratio = f"{plan.recompute_ratio:g}" if plan.recompute == "selective" and plan.recompute_ratio < 1 else ""
        parts.append(f"rc-{plan.recompute}{ratio}")
    if plan.offloads:
        parts.append(describe_offload(plan))
    return " ".join(parts)


def describe_offload(plan: Plan) -> str:
    """'off p:disk o:disk g:disk' (params, optimizer, gradients), or the memory budget that places them."""
    if plan.memory_budget:
        return f"off budget {plan.memory_budget}"
    tiers = plan.offload_tiers
    return "off " + " ".join(
        f"{state[0]}:{tiers[state]}" for state in ("params", "optimizer", "gradients") if tiers[state] != "none"
    )


def describe_tiers(offload: OffloadBytes) -> str:
    """Where the states ended up: 'params disk, optimizer disk, grads disk'."""
    return ", ".join(f"{state} {tier}" for state, tier in summarize_tiers(offload.tiers).items())


class Estimator:
    """Memory and time models of one model, workload and cluster; `estimate(plan)` for each plan."""

    def __init__(self, shape: ModelShape, workload: Workload, *, cluster: Cluster, profile: str = "plait") -> None:
        self.shape = shape
        self.workload = workload
        self.cluster = cluster
        shared = {"schedules": ScheduleCache(), "layouts": LayoutCache(shape)}
        self.memory = MemoryModel(shape, workload, profile=profile, **shared)
        self.time = TimeModel(shape, workload, cluster=cluster, profile=profile, **shared)
        self._flops_per_token = shape.config.flops_per_token(workload.seq_len)  # the same for every plan

    def estimate(self, plan: Plan) -> Estimate:
        """`plan`'s estimate; an offloading plan's from the same plan on the device (`with_offload`)."""
        plan = with_zero_shard(plan, ranks_per_node=self.cluster.devices_per_node)
        on_device = dataclasses.replace(plan, offload_optimizer="none", offload_gradients="none",
                                        offload_params="none", memory_budget="")  # fmt: skip
        memory = self.memory.estimate(on_device, reserved=self.cluster.reserved_bytes)
        base = self._finish(on_device, memory, self.time.estimate(on_device))
        return self.with_offload(base, plan) if plan.offloads else base

    def with_offload(self, base: Estimate, plan: Plan) -> Estimate:
        """`plan` (`base.plan` with offload fields set) from `base`'s on-device estimate."""
        layout = self.memory.layouts.get(plan)
        stage = base.memory.stage
        units = self.shape.stage_units(stage, num_layers=layout.layers_per_rank[stage], pp=plan.pp, tp=plan.tp)
        memory, time, offload = apply_offload(
            plan, base.memory, base.time, units=units, cluster=self.cluster, clips=self.workload.clips
        )
        return dataclasses.replace(self._finish(plan, memory, time), offload=offload)

    def _finish(self, plan: Plan, memory: MemoryBreakdown, time: TimeBreakdown) -> Estimate:
        tokens_per_s = self.workload.tokens / time.total
        utilisation = mfu(
            tokens_per_s=tokens_per_s, flops_per_token=self._flops_per_token, peak_flops=self.cluster.peak_flops,
            num_ranks=self.cluster.num_devices,
        )  # fmt: skip
        return Estimate(plan, memory, time, tokens_per_s, utilisation, fits(memory, self.cluster))
