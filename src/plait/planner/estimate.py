"""One plan's estimate: its memory breakdown, its step time, and the throughput they imply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plait.config import Plan
from plait.planner.cluster import Cluster
from plait.planner.layout import LayoutCache, ScheduleCache
from plait.planner.memory import MemoryBreakdown, MemoryModel
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
        }


def describe(plan: Plan) -> str:
    """A short name for a plan: the degrees and switches that differ from the defaults."""
    parts = [f"dp{plan.dp}", f"tp{plan.tp}", f"pp{plan.pp}", f"z{plan.zero}", plan.precision, f"m{plan.microbatches}"]
    if plan.sequence_parallel:
        parts.append("sp")
    if plan.pp > 1:
        parts.append(plan.pp_schedule + (f"x{plan.pp_chunks}" if plan.pp_chunks > 1 else ""))
    if plan.recompute != "none":
        ratio = f"{plan.recompute_ratio:g}" if plan.recompute == "selective" and plan.recompute_ratio < 1 else ""
        parts.append(f"rc-{plan.recompute}{ratio}")
    return " ".join(parts)


class Estimator:
    """Memory and time models of one model, workload and cluster; `estimate(plan)` for each plan."""

    def __init__(self, shape: ModelShape, workload: Workload, *, cluster: Cluster, profile: str = "plait") -> None:
        self.shape = shape
        self.workload = workload
        self.cluster = cluster
        shared = {"schedules": ScheduleCache(), "layouts": LayoutCache(shape, seq_len=workload.seq_len)}
        self.memory = MemoryModel(shape, workload, profile=profile, **shared)
        self.time = TimeModel(shape, workload, cluster=cluster, profile=profile, **shared)

    def estimate(self, plan: Plan) -> Estimate:
        memory = self.memory.estimate(plan, reserved=self.cluster.reserved_bytes)
        time = self.time.estimate(plan)
        tokens_per_s = self.workload.tokens / time.total
        flops = self.shape.config.flops_per_token(self.workload.seq_len)
        utilisation = mfu(
            tokens_per_s=tokens_per_s, flops_per_token=flops, peak_flops=self.cluster.peak_flops,
            num_ranks=self.cluster.num_devices,
        )  # fmt: skip
        fits = memory.total <= self.cluster.device_memory
        return Estimate(plan, memory, time, tokens_per_s, utilisation, fits)
