"""The planner's schedule cache (quarter-rounded backward/forward ratios, fewer micro-batches simulated) against
the schedule simulator run exactly: the makespan within 1.5% for ratios off the quarter grid."""

from __future__ import annotations

import pytest

from plait.config import Plan
from plait.pipeline.schedules import build_schedule
from plait.pipeline.simulate import simulate
from plait.planner.layout import ScheduleCache


@pytest.mark.parametrize(
    ("schedule", "chunks", "microbatches", "pp"),
    [
        ("interleaved", 8, 32, 16),
        ("interleaved", 3, 64, 8),
        ("1f1b", 1, 16, 8),
        ("gpipe", 1, 8, 4),
        ("zb-h1", 1, 16, 8),
    ],
)
@pytest.mark.parametrize("ratio", [1.62, 1.9, 2.1])
def test_cached_makespan_matches_the_exact_simulation(
    schedule: str, chunks: int, microbatches: int, pp: int, ratio: float
) -> None:
    plan = Plan(dp=1, pp=pp, pp_schedule=schedule, pp_chunks=chunks, microbatches=microbatches)
    forward, backward = 0.01, 0.01 * ratio
    cached = ScheduleCache().timing(plan, forward=forward, backward=backward).makespan
    built = build_schedule(schedule, num_ranks=pp, num_microbatches=microbatches, num_chunks=chunks)
    exact = simulate(built, forward_cost=forward, backward_cost=backward).makespan
    assert cached == pytest.approx(exact, rel=0.015)
