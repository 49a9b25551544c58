"""What the memory and time models share: one model shape and workload under estimate, the activation
profile, and the caches a search hands both models (`ScheduleCache`, `LayoutCache`)."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from plait.planner.layout import LayoutCache, ScheduleCache
from plait.planner.shape import ModelShape
from plait.planner.workload import Workload


@dataclass(eq=False)
class PlanModel:
    """Fresh caches unless given; `plait.planner.estimate.Estimator` gives both models the same ones."""

    shape: ModelShape
    workload: Workload
    _: KW_ONLY
    profile: str = "plait"
    schedules: ScheduleCache | None = None
    layouts: LayoutCache | None = None

    def __post_init__(self) -> None:
        self.schedules = self.schedules or ScheduleCache()
        self.layouts = self.layouts or LayoutCache(self.shape)
