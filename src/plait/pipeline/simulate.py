"""Time a pipeline schedule on an ideal machine: fixed pass costs, true dependencies.

Each rank runs its action list in order; an action starts when its rank is
free and everything it depends on has finished (plus `comm_cost` when that
happened on another rank):

- F of virtual stage s, micro-batch i, needs F of stage s-1 for i;
- B of s for i needs F of s for i and B of s+1 for i (the last stage only its F);
- W of s for i needs B of s for i.

>>> from plait.pipeline.schedules import build_schedule
>>> simulate(build_schedule("gpipe", num_ranks=4, num_microbatches=4)).bubble_fraction
0.42857142857142855
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.pipeline.schedules_base import Action, Schedule, ScheduleDeadlockError, stage_location


@dataclass(frozen=True)
class Interval:
    """A span of time one rank spends on one action."""

    start: float
    end: float
    kind: str
    microbatch: int
    chunk: int


@dataclass(frozen=True)
class SimResult:
    """What `simulate` measured.

    `intervals[r]` are rank r's busy spans in execution order. A rank's bubble
    fraction is its idle time over the makespan; `bubble_fraction` is all
    ranks' idle time over num_ranks * makespan. `peak_activations[r]` is the
    most (micro-batch, chunk) pairs rank r holds activations for at once: from
    the end of F until the end of B, or until the end of W when the schedule
    splits the weight gradient (W still reads the stage's inputs and output
    gradients). With v chunks, one pair holds 1/v of a stage's activations.
    """

    intervals: tuple[tuple[Interval, ...], ...]
    makespan: float
    bubble_fractions: tuple[float, ...]
    bubble_fraction: float
    peak_activations: tuple[int, ...]


def simulate(
    schedule: Schedule,
    *,
    forward_cost: float = 1.0,
    backward_cost: float = 2.0,
    weight_cost: float | None = None,
    comm_cost: float = 0.0,
) -> SimResult:
    """Run `schedule` with these per-action costs and report its timeline.

    `backward_cost` is a full backward (input and weight gradients). When the
    schedule splits W off, B costs backward_cost - weight_cost and W costs
    weight_cost, which defaults to half the backward; otherwise B costs
    backward_cost and weight_cost is ignored. Costs are per action: for an
    interleaved schedule that is one chunk's pass. Raises
    ScheduleDeadlockError, naming each rank's stuck action, if no rank can
    proceed while actions remain.
    """
    costs = _action_costs(schedule, forward_cost, backward_cost, weight_cost)
    if comm_cost < 0:
        raise ValueError(f"comm_cost must be >= 0, got {comm_cost}")
    queues = [schedule.actions(rank) for rank in range(schedule.num_ranks)]
    intervals: list[list[Interval]] = [[] for _ in queues]
    finished: dict[tuple[str, int, int], float] = {}
    moved = True
    while moved:
        moved = False
        for rank, queue in enumerate(queues):
            while len(intervals[rank]) < len(queue):
                action = queue[len(intervals[rank])]
                ready = _ready_time(schedule, action, rank, finished, comm_cost)
                if ready is None:
                    break
                free = intervals[rank][-1].end if intervals[rank] else 0.0
                start = max(ready, free)
                interval = Interval(start, start + costs[action.kind], action.kind, action.microbatch, action.chunk)
                intervals[rank].append(interval)
                finished[(action.kind, schedule.stage_of(action, rank), action.microbatch)] = interval.end
                moved = True
    _raise_if_stuck(schedule, queues, intervals, finished)
    return _summarize(schedule, intervals)


def _action_costs(
    schedule: Schedule, forward_cost: float, backward_cost: float, weight_cost: float | None
) -> dict[str, float]:
    if forward_cost < 0 or backward_cost < 0:
        raise ValueError(f"pass costs must be >= 0, got forward {forward_cost}, backward {backward_cost}")
    if not schedule.splits_weight_grad:
        return {"F": forward_cost, "B": backward_cost}
    weight = backward_cost / 2 if weight_cost is None else weight_cost
    if not 0 <= weight <= backward_cost:
        raise ValueError(
            f"weight_cost is the weight-gradient share of backward_cost={backward_cost}, so it lies in "
            f"[0, {backward_cost}]; got {weight_cost}"
        )
    return {"F": forward_cost, "B": backward_cost - weight, "W": weight}


def _dependencies(schedule: Schedule, action: Action, rank: int) -> list[tuple[str, int, int]]:
    """(kind, virtual stage, micro-batch) of each action `action` waits for."""
    stage, microbatch = schedule.stage_of(action, rank), action.microbatch
    if action.kind == "F":
        return [("F", stage - 1, microbatch)] if stage > 0 else []
    if action.kind == "B":
        upstream = [("B", stage + 1, microbatch)] if stage < schedule.num_stages - 1 else []
        return [("F", stage, microbatch), *upstream]
    return [("B", stage, microbatch)]


def _ready_time(
    schedule: Schedule, action: Action, rank: int, finished: dict[tuple[str, int, int], float], comm_cost: float
) -> float | None:
    """When `action`'s inputs are all on `rank`, or None if some are not computed yet."""
    ready = 0.0
    for dependency in _dependencies(schedule, action, rank):
        if dependency not in finished:
            return None
        source_rank, _ = stage_location(dependency[1], schedule.num_ranks)
        ready = max(ready, finished[dependency] + (comm_cost if source_rank != rank else 0.0))
    return ready


def _raise_if_stuck(
    schedule: Schedule,
    queues: list[list[Action]],
    intervals: list[list[Interval]],
    finished: dict[tuple[str, int, int], float],
) -> None:
    stuck = []
    for rank, queue in enumerate(queues):
        if len(intervals[rank]) < len(queue):
            action = queue[len(intervals[rank])]
            waits = [dep for dep in _dependencies(schedule, action, rank) if dep not in finished]
            stuck.append(f"rank {rank} at {action} (stage {schedule.stage_of(action, rank)}) waits for {waits}")
    if stuck:
        raise ScheduleDeadlockError(f"schedule {schedule.name!r} deadlocks: " + "; ".join(stuck))


def _summarize(schedule: Schedule, intervals: list[list[Interval]]) -> SimResult:
    makespan = max((spans[-1].end for spans in intervals if spans), default=0.0)
    idle = [makespan - sum(span.end - span.start for span in spans) for spans in intervals]
    fractions = tuple(time / makespan if makespan else 0.0 for time in idle)
    overall = sum(idle) / (makespan * len(intervals)) if makespan else 0.0
    release = "W" if schedule.splits_weight_grad else "B"
    return SimResult(
        intervals=tuple(tuple(spans) for spans in intervals),
        makespan=makespan,
        bubble_fractions=fractions,
        bubble_fraction=overall,
        peak_activations=tuple(_peak_in_flight(spans, release) for spans in intervals),
    )


def _peak_in_flight(spans: list[Interval], release: str) -> int:
    held = peak = 0
    for span in spans:
        held += 1 if span.kind == "F" else -1 if span.kind == release else 0
        peak = max(peak, held)
    return peak
