"""Every valid plan for a model on a cluster, estimated and ranked by step time among those that fit."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from plait.config import Config, DataConfig, Plan, TrainConfig
from plait.planner.cluster import Cluster
from plait.planner.estimate import Estimate, Estimator
from plait.planner.shape import ModelShape
from plait.planner.workload import Workload
from plait.train.setup import check_tensor_parallel

SCHEDULES = ("1f1b", "interleaved", "zb-h1", "gpipe")


@dataclass(frozen=True)
class SearchSpace:
    """Which plan options the search may choose; fix one by giving a single value."""

    precision: str = "bf16"
    zero: tuple[int, ...] = (0, 1, 2, 3)
    recompute: tuple[str, ...] = ("none", "selective", "full")
    microbatches: tuple[int, ...] = ()  # () lets the search choose among divisors of the per-rank batch
    schedules: tuple[str, ...] = SCHEDULES
    tp: tuple[int, ...] = ()  # () allows every tp that divides the model and fits in a node
    pp: tuple[int, ...] = ()
    max_microbatches_per_stage: int = 8
    selective_ratio: float = 0.5  # plait's selective recomputation: the fraction of layers recomputed
    offload: tuple[str, ...] = ()  # tiers offloaded states may use: "cpu", "disk" (() keeps every state on the device)
    offload_dir: str = ""  # where disk-tier plans put their files (needed with "disk")
    ep: tuple[int, ...] = ()  # () allows every ep dividing dp and the experts (MoE models only; 1 otherwise)
    # () lets the search choose cp among divisors whose dp divides the batch; a larger cp is tried only while
    # the smaller one leaves a layout with no plan that fits for its activations (cp is never faster than dp
    # on the same work)
    cp: tuple[int, ...] = ()
    # ZeRO shard groups: "all" dp ranks, and/or "node" (hybrid sharding: shard inside a node, replicate across)
    zero_shard: tuple[str, ...] = ("all",)

    def __post_init__(self) -> None:
        Plan(precision=self.precision)  # validates the name
        if set(self.offload) - {"cpu", "disk"} or ("disk" in self.offload and not self.offload_dir):
            raise ValueError(
                f"SearchSpace(offload={self.offload!r}): offload tiers are 'cpu' and 'disk'; 'disk' needs "
                "offload_dir (e.g. --offload-dir /mnt/nvme/plait-offload)"
            )
        for stage in self.zero:
            Plan(zero=stage)
        for size in self.cp:
            Plan(cp=size)
        for mode in self.recompute:
            Plan(recompute=mode)
        for shard in self.zero_shard:
            Plan(zero=1, zero_shard=shard)
        if not self.zero or not self.recompute or not self.schedules or not self.zero_shard:
            raise ValueError("a search space needs at least one zero stage, recompute mode, schedule and zero_shard")

    def relax(self, **changes: object) -> SearchSpace:
        return dataclasses.replace(self, **changes)


@dataclass
class SearchResult:
    """Estimates, fitting plans first by step time, then the rest by memory."""

    estimates: list[Estimate]
    seconds: float
    cluster: Cluster
    num_invalid: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def fitting(self) -> list[Estimate]:
        return [e for e in self.estimates if e.fits]

    @property
    def best(self) -> Estimate | None:
        fitting = self.fitting
        return fitting[0] if fitting else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_options(shape: ModelShape, cluster: Cluster, space: SearchSpace, seq_len: int) -> list[tuple[int, bool]]:
    """(tp, sequence_parallel) pairs whose splits divide the model; tp stays inside a node."""
    out = []
    for tp in space.tp or _divisors(cluster.num_devices):
        if tp > cluster.devices_per_node and not space.tp:
            continue
        # MoE layers route whole sequences: plait refuses sequence parallel with them
        for sp in (False, True) if tp > 1 and not shape.config.moe_experts else (False,):
            try:
                check_tensor_parallel(shape.config, tp=tp, seq_len=seq_len, sequence_parallel=sp)
            except ValueError:
                continue
            out.append((tp, sp))
    return out


def _microbatch_options(per_rank: int, pp: int, space: SearchSpace) -> list[int]:
    if space.microbatches:
        return [m for m in space.microbatches if per_rank % m == 0]
    limit = space.max_microbatches_per_stage * pp
    return [m for m in _divisors(per_rank) if m <= limit]


def _pipeline_options(pp: int, num_layers: int, space: SearchSpace) -> list[tuple[str, int]]:
    """(schedule, chunks per rank) pairs; interleaving takes every chunk count from 2 to the most the layers
    allow (at least one layer per virtual stage)."""
    if pp == 1:
        return [("1f1b", 1)]
    out = []
    for name in space.schedules:
        if name == "interleaved":
            out += [(name, chunks) for chunks in range(2, num_layers // pp + 1)]
        else:
            out.append((name, 1))
    return out


def _cp_options(ranks: int, workload: Workload, space: SearchSpace) -> list[int]:
    """Context-parallel degrees for ``ranks`` = dp x cp ranks, smallest first: those whose dp divides the
    global batch and whose cp divides the sequence into 2 * cp chunks (or the space's own list)."""
    sizes = [cp for cp in space.cp or _divisors(ranks) if ranks % cp == 0]
    return [
        cp for cp in sizes
        if workload.global_batch % (ranks // cp) == 0 and (cp == 1 or workload.seq_len % (2 * cp) == 0)
    ]  # fmt: skip


def _ep_options(shape: ModelShape, dp: int, space: SearchSpace) -> list[int]:
    """Expert-parallel degrees: those dividing both dp (ep is carved from it) and the experts per layer."""
    experts = shape.config.moe_experts
    if not experts:
        return [1]
    return [ep for ep in space.ep or _divisors(dp) if dp % ep == 0 and experts % ep == 0]


def candidate_layouts(
    shape: ModelShape, workload: Workload, cluster: Cluster, space: SearchSpace
) -> Iterator[tuple[dict, list[int]]]:
    """Every (tp, pp, sequence_parallel) layout with its cp degrees, smallest first."""
    world = cluster.num_devices
    for tp, sp in _tp_options(shape, cluster, space, workload.seq_len):
        for pp in space.pp or _divisors(world // tp):
            if (world // tp) % pp or pp > shape.num_layers:
                continue
            yield {"tp": tp, "pp": pp, "sequence_parallel": sp}, _cp_options(world // tp // pp, workload, space)


def layout_plans(
    shape: ModelShape, workload: Workload, cluster: Cluster, space: SearchSpace, *, layout: dict, cp: int
) -> Iterator[Plan]:
    """The plans of one layout at one cp degree (micro-batching, schedule, ZeRO, recompute, ep), before
    validation."""
    dp = cluster.num_devices // layout["tp"] // layout["pp"] // cp  # divides the batch (`_cp_options`)
    for m in _microbatch_options(workload.global_batch // dp, layout["pp"], space):
        for (schedule, chunks), zero, recompute, ep in itertools.product(
            _pipeline_options(layout["pp"], shape.num_layers, space), space.zero, space.recompute,
            _ep_options(shape, dp, space),
        ):  # fmt: skip
            ratio = space.selective_ratio if recompute == "selective" else 1.0
            plan = Plan(
                dp=dp, cp=cp, ep=ep, zero=zero, precision=space.precision, microbatches=m, recompute=recompute,
                recompute_ratio=ratio, pp_schedule=schedule, pp_chunks=chunks, **layout,
            )  # fmt: skip
            yield from zero_shard_variants(plan, space, cluster)


def zero_shard_variants(plan: Plan, space: SearchSpace, cluster: Cluster) -> Iterator[Plan]:
    """`plan` sharded over all dp ranks and/or inside each node, as the space allows; "node" only where
    it differs from "all" (ZeRO on, a dp group spanning nodes that split it evenly)."""
    if "all" in space.zero_shard:
        yield plan
    if "node" not in space.zero_shard or plan.zero == 0:
        return
    hybrid = dataclasses.replace(plan, zero_shard="node")
    try:
        shard = hybrid.zero_shard_size(cluster.devices_per_node)
    except ValueError:
        return
    if shard < plan.dp:
        yield hybrid


# (params, optimizer, gradients) placements the search tries: the optimizer (and the gradient shard it
# reads) first, then ZeRO-3's parameter shards, each on the host and, given a disk, on disk.
OFFLOAD_PLACEMENTS = (
    ("none", "cpu", "cpu"),
    ("cpu", "cpu", "cpu"),
    ("none", "disk", "cpu"),
    ("none", "disk", "disk"),
    ("cpu", "disk", "disk"),
    ("disk", "disk", "disk"),
)


def offload_variants(plan: Plan, space: SearchSpace) -> Iterator[Plan]:
    """`plan` with each placement of `OFFLOAD_PLACEMENTS` its ZeRO stage and the space's tiers allow."""
    if not space.offload or plan.zero == 0 or plan.ep > 1 or plan.zero_shard != "all":  # plait refuses these
        return
    for params, optimizer, gradients in OFFLOAD_PLACEMENTS:
        if params != "none" and plan.zero != 3:
            continue
        if not {params, optimizer, gradients} - {"none"} <= set(space.offload):
            continue
        yield dataclasses.replace(
            plan, offload_params=params, offload_optimizer=optimizer, offload_gradients=gradients,
            offload_dir=space.offload_dir if "disk" in (params, optimizer, gradients) else "",
        )  # fmt: skip


def keep_offload(plain: list[Estimate], offloaded: list[Estimate]) -> list[Estimate]:
    """Offloading plans worth showing: every one when no plan fits on the device alone, else only
    those that fit and beat the fastest that does."""
    fastest = min((e.step_s for e in plain if e.fits), default=None)
    if fastest is None:
        return offloaded
    return [e for e in offloaded if e.fits and e.step_s < fastest]


def _activations_overflow(estimate: Estimate, cluster: Cluster) -> bool:
    """Whether the plan would fit on the device without what its sequence's activations take."""
    memory = estimate.memory
    return memory.total - memory.activations - memory.working <= cluster.device_memory


def is_valid(plan: Plan, shape: ModelShape, workload: Workload) -> bool:
    """plait's own launch checks (`Plan.check_available`, `Config.check_batching`) and stages <= layers."""
    try:
        plan.check_available()
        train, data = TrainConfig(global_batch=workload.global_batch), DataConfig(seq_len=workload.seq_len)
        Config(plan=plan, train=train, data=data).check_batching(plan.dp)
    except ValueError:
        return False
    return plan.pp * plan.pp_chunks <= shape.num_layers


def search(
    shape: ModelShape,
    workload: Workload,
    *,
    cluster: Cluster,
    space: SearchSpace | None = None,
    profile: str = "plait",
) -> SearchResult:
    """Estimate every valid plan; fitting plans first, fastest first."""
    space = space or SearchSpace()
    started = time.perf_counter()
    estimator = Estimator(shape, workload, cluster=cluster, profile=profile)
    estimates, offloaded, invalid = [], [], 0
    for layout, cps in candidate_layouts(shape, workload, cluster, space):
        # a larger cp does a dp rank's work plus more ring traffic: it is tried only while nothing fits
        # and the sequence's activations are what overflows (cp divides those, not the model states)
        for cp in cps:
            found = []
            for plan in layout_plans(shape, workload, cluster, space, layout=layout, cp=cp):
                if not is_valid(plan, shape, workload):
                    invalid += 1
                    continue
                found.append(estimator.estimate(plan))
                offloaded += [estimator.with_offload(found[-1], variant) for variant in offload_variants(plan, space)]
            estimates += found
            if any(e.fits for e in found) or not any(_activations_overflow(e, cluster) for e in found):
                break
    estimates += keep_offload(estimates, offloaded)
    # among equally fast plans, the one that communicates least, then the one that needs least memory
    estimates.sort(
        key=lambda e: (not e.fits, e.step_s if e.fits else e.memory.total, e.time.dp_comm, e.memory.total, e.time.io)
    )
    return SearchResult(estimates, time.perf_counter() - started, cluster, num_invalid=invalid)
