"""Where a plan puts the layers: pipeline stages balanced as plait's runtime balances them, and
how many micro-batches each pipeline rank holds at once under its schedule."""

from __future__ import annotations

from dataclasses import dataclass

from plait.config import Plan
from plait.pipeline.partition import balanced_split, ranges_from_split_points
from plait.pipeline.schedules import Schedule, build_schedule
from plait.pipeline.simulate import SimResult, simulate
from plait.planner.shape import ModelShape


@dataclass(frozen=True)
class StageLayout:
    """Layers per pipeline rank (all its chunks together) and the chunk ranges of the virtual stages."""

    layers_per_rank: tuple[int, ...]
    chunk_layers: tuple[int, ...]

    def layer_indices(self, rank: int) -> list[int]:
        """The layers (from 0) pipeline rank `rank` holds: its chunks rank, rank + pp, ... in order."""
        pp = len(self.layers_per_rank)
        starts = [sum(self.chunk_layers[:v]) for v in range(len(self.chunk_layers))]
        return [
            i
            for v in range(rank, len(self.chunk_layers), pp)
            for i in range(starts[v], starts[v] + self.chunk_layers[v])
        ]

    def busiest_rank(self) -> int:
        """The pipeline rank with the most layers (the first of them)."""
        return self.layers_per_rank.index(max(self.layers_per_rank))


def stage_layout(shape: ModelShape, plan: Plan) -> StageLayout:
    """plait's cost-balanced split (`pipeline.partition`) with the costs it balances (`partition_costs`);
    or `plan.pp_split` when given, checked as the runtime checks it (its first chunk may hold the
    embedding alone and its last the head alone: 0 layers)."""
    num_stages = plan.pp * plan.pp_chunks
    if num_stages == 1:
        return StageLayout((shape.num_layers,), (shape.num_layers,))
    if plan.pp_split:
        ranges = ranges_from_split_points(plan.pp_split, num_layers=shape.num_layers, num_stages=num_stages)
        chunks = [len(layers) for layers in ranges]
    else:
        chunks = [len(r) for r in balanced_split(partition_costs(shape, plan), num_stages)]
    per_rank = [sum(chunks[v] for v in range(rank, num_stages, plan.pp)) for rank in range(plan.pp)]
    return StageLayout(tuple(per_rank), tuple(chunks))


def partition_costs(shape: ModelShape, plan: Plan) -> list[float]:
    """The layer costs `pipeline.partition.layer_costs` gives the runtime's split, with the final norm +
    head's added to the last layer's and the embedding's (none) to the first's.

    The runtime splits the model after tp and ep have sharded it, so it weighs what one tp rank holds:
    2 per parameter of the layer there (the tp-replicated norms and biases too, and every expert this
    ep rank keeps, not only the top_k a token runs) plus attention's 4 * seq_len * d_model, which tp
    does not divide; the head is its tp rank's vocabulary rows. Global layer costs beside a head
    divided by tp would move layers to the last stage under tp. The runtime builds the stages before
    it sees a batch, so seq_len is the model's max_seq_len, not the workload's.
    """
    attention = 4.0 * shape.config.max_seq_len * shape.hidden
    costs = [
        2.0 * sum(unit.local(plan.tp) for unit in shape.layer_units(index, ep=plan.ep)) + attention
        for index in range(shape.num_layers)
    ]
    costs[-1] += 2.0 * sum(unit.local(plan.tp) for unit in shape.last_units(plan.tp, with_embedding=False))
    return costs


@dataclass(frozen=True)
class PipelineTiming:
    """A schedule's makespan for given pass costs, and the micro-batches (in whole-stage units) each rank holds."""

    makespan: float
    in_flight: tuple[float, ...]


class ScheduleCache:
    """plait's schedule simulator, run on few enough micro-batches to be quick.

    Past the warm-up every schedule here repeats one forward and one backward
    per micro-batch on every rank, so with m' <= m micro-batches simulated the
    makespan for m is makespan(m') + (m - m') * (F + B), and the peak in
    flight is already reached. The backward/forward ratio is rounded to a
    quarter so that a search reuses the simulations; the busy time that the
    rounding took off (or added to) every one of a rank's m * v backward
    passes is given back, so only the idle time comes from the rounded run.
    """

    def __init__(self) -> None:
        self._results: dict[tuple[object, ...], SimResult] = {}
        self._schedules: dict[tuple[object, ...], Schedule] = {}

    def timing(self, plan: Plan, *, forward: float = 1.0, backward: float = 2.0) -> PipelineTiming:
        v, p, m = plan.pp_chunks, plan.pp, plan.microbatches
        simulated = min(m, (v + 1) * p)
        if plan.pp_schedule == "interleaved":
            simulated = max(p, simulated // p * p)
        ratio = max(0.25, round(4 * backward / forward) / 4) if forward > 0 else 2.0
        shape = (plan.pp_schedule, p, simulated, v)
        if shape not in self._schedules:
            self._schedules[shape] = build_schedule(
                plan.pp_schedule, num_ranks=p, num_microbatches=simulated, num_chunks=v
            )
        key = (*shape, ratio)
        if key not in self._results:
            self._results[key] = simulate(self._schedules[shape], forward_cost=1.0, backward_cost=ratio)
        result = self._results[key]
        scale = forward  # the simulation ran with forward cost 1
        rounding = simulated * v * (backward - ratio * forward)  # the simulated backwards' cost, made exact
        makespan = result.makespan * scale + rounding + (m - simulated) * v * (forward + backward)
        return PipelineTiming(makespan=makespan, in_flight=tuple(peak / v for peak in result.peak_activations))


class LayoutCache:
    """`stage_layout` by (pp, chunks, tp, ep, split): the balanced split is the costliest step of an estimate."""

    def __init__(self, shape: ModelShape) -> None:
        self.shape = shape
        self._layouts: dict[tuple[object, ...], StageLayout] = {}

    def get(self, plan: Plan) -> StageLayout:
        key = (plan.pp, plan.pp_chunks, plan.tp, plan.ep, tuple(plan.pp_split))
        if key not in self._layouts:
            self._layouts[key] = stage_layout(self.shape, plan)
        return self._layouts[key]
