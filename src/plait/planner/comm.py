"""Seconds of the collectives a plan issues per step, counted as plait's runtime issues them.

A collective of B bytes (the full buffer) over N ranks on a link costs a
ring's (N-1)/N * B / bandwidth (twice that for an all-reduce) plus one
latency per ring step, scaled by the link's factor for its kind.

- ZeRO reduces and gathers unit by unit (one collective per flat unit);
  bucketed data parallel (fp32, stage 0) once per gradient bucket.
- Tensor parallel without sequence parallel: per layer forward, one
  all-reduce after each row-parallel projection (attention output, MLP
  down); backward, one all-reduce where the region is entered: once per
  norm output, since the projections fed one tensor (q, k, v; gate, up)
  share one entry (`columns=2`, 1 for the parallel block), as Megatron's
  fused projections do.
- An MoE layer instead: forward, the attention output's all-reduce and one
  all-reduce of its experts' partial outputs (tokens x top_k x capacity
  factor slots of d_model, `expert_slot_bytes`), after all its experts;
  backward, the attention's entry and the experts' entry (the same slots).
- With sequence parallel each entry all-gathers the sequence and every
  row-parallel projection reduce-scatters its output; backward swaps them.
- Expert parallel: per MoE layer and micro-batch, two all-to-alls forward
  (dispatch, combine) and two backward (their reverses), two more where
  recomputation replays the forward. Each sends tokens x top_k x capacity
  factor (1 when dropless) x d_model x element bytes x (ep-1)/ep from a
  rank (`all_to_all_bytes`; the slots of its own experts stay). Expert
  gradients are reduced over edp (dp / ep ranks, stride tp x ep), the rest
  over dp.
- Hybrid sharding (plan.zero_shard = s < dp): the ZeRO collectives run over
  the s ranks of a shard group (stride tp, inside a node), and each gradient
  reduction is followed by an all-reduce of the rank's shard (P/s elements
  of fp32) over the dp/s replicas (stride tp x s, across nodes).
"""

from __future__ import annotations

import math

from plait.config import Plan
from plait.planner.cluster import Cluster, Link
from plait.planner.memory import dense_shard_ranks
from plait.planner.shape import ModelShape, Unit
from plait.planner.workload import PARAM_BYTES

MB = 2**20


def _ring_steps(kind: str, ranks: int) -> int:
    return 2 * (ranks - 1) if kind == "all_reduce" else ranks - 1


def collective_seconds(num_bytes: float, *, ranks: int, link: Link, kind: str) -> float:
    """With a measured table: the all-reduce time of that buffer, scaled by ring steps to this kind and
    group size; otherwise the ring model. Either way times the link's factor for the kind."""
    if ranks == 1 or num_bytes == 0:
        return 0.0
    steps = _ring_steps(kind, ranks)
    if link.table and link.kind_table(kind) is not link.table:  # this kind's own measured times
        measured = link.all_reduce_table_seconds(num_bytes, kind=kind)
        return measured * steps / _ring_steps(kind, link.table_ranks)
    if link.table:
        measured = link.all_reduce_table_seconds(num_bytes)
        seconds = measured * steps / _ring_steps("all_reduce", link.table_ranks)
    else:
        seconds = steps / ranks * num_bytes / link.bandwidth + steps * link.latency
    return seconds * link.scale(kind)


def tp_layer_seconds(
    plan: Plan, hidden_bytes: float, *, columns: int, cluster: Cluster, staged: bool = True
) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's tensor-parallel collectives for one micro-batch;
    `columns` is how many column-parallel projections take the layer's input separately; `staged`: with
    plait's copies around each collective (`_staged_bytes`; Megatron's sequence-first layout has none)."""
    if plan.tp == 1:
        return 0.0, 0.0
    link = cluster.link(plan.tp)

    def cost(kind: str) -> float:
        copies = _staged_bytes(kind, hidden_bytes, ranks=plan.tp) if staged else 0.0
        return collective_seconds(hidden_bytes, ranks=plan.tp, link=link, kind=kind) + copies / cluster.memory_bandwidth

    if plan.sequence_parallel:
        return columns * cost("all_gather") + 2 * cost("reduce_scatter"), columns * cost("reduce_scatter") + 2 * cost(
            "all_gather"
        )
    return 2 * cost("all_reduce"), columns * cost("all_reduce")


def _staged_bytes(kind: str, num_bytes: float, *, ranks: int) -> float:
    """Bytes plait's tensor-parallel collectives copy around the wire (read and written): an all-reduce
    clones its input; the sequence all-gather and reduce-scatter move the sequence dim to the front and
    back, copying the local and the full buffer."""
    moved = num_bytes if kind == "all_reduce" else num_bytes + num_bytes / ranks
    return 2 * moved


def _reduce_kind(plan: Plan, cluster: Cluster) -> str:
    if plan.reduce_op != "auto":
        return plan.reduce_op
    return "all_reduce" if cluster.backend == "gloo" else "reduce_scatter"


def expert_slot_bytes(shape: ModelShape, plan: Plan, *, tokens: int) -> float:
    """Bytes of the token slots one rank's experts take per MoE layer for `tokens` tokens (one micro-batch):
    tokens x top_k x capacity factor (1 dropless) rows of d_model (balanced over ep, as many as it sends)."""
    c = shape.config
    return tokens * c.moe_top_k * (c.moe_capacity_factor or 1.0) * c.d_model * PARAM_BYTES[plan.precision]


def all_to_all_bytes(shape: ModelShape, plan: Plan, *, tokens: int) -> float:
    """Bytes one rank sends in one expert-parallel all-to-all of `tokens` tokens (one micro-batch)."""
    return expert_slot_bytes(shape, plan, tokens=tokens) * (plan.ep - 1) / plan.ep


def moe_tp_layer_seconds(
    shape: ModelShape, plan: Plan, hidden_bytes: float, *, tokens: int, cluster: Cluster
) -> tuple[float, float]:
    """(forward, backward) seconds of one MoE layer's tensor-parallel collectives for one micro-batch: the
    attention's output and entry all-reduces, and the experts' (their outputs forward, their input's
    gradient backward), once per layer for all its experts."""
    if plan.tp == 1:
        return 0.0, 0.0
    link = cluster.link(plan.tp)
    slots = expert_slot_bytes(shape, plan, tokens=tokens)
    one = sum(collective_seconds(b, ranks=plan.tp, link=link, kind="all_reduce") for b in (hidden_bytes, slots))
    return one, one


def ep_exchanges_per_layer(plan: Plan) -> tuple[float, float]:
    """(forward, backward) token all-to-alls of one MoE layer per micro-batch: dispatch and combine, their
    reverses, and the forward's replayed where recomputation replays it (selective: its fraction of layers)."""
    recomputed = {"full": 1.0, "selective": plan.recompute_ratio}.get(plan.recompute, 0.0)
    return 2.0, 2.0 + 2.0 * recomputed


def ep_layer_seconds(shape: ModelShape, plan: Plan, *, tokens: int, cluster: Cluster) -> tuple[float, float]:
    """(forward, backward) seconds of one MoE layer's all-to-alls for one micro-batch of `tokens` tokens,
    with the exchange of per-expert counts (8 bytes each) before every dispatch."""
    if plan.ep == 1:
        return 0.0, 0.0
    link = cluster.link(plan.ep, stride=plan.tp)
    # collective_seconds takes the whole buffer and applies the ring's (ep-1)/ep itself
    buffer = all_to_all_bytes(shape, plan, tokens=tokens) * plan.ep / (plan.ep - 1)
    one = collective_seconds(buffer, ranks=plan.ep, link=link, kind="all_to_all")
    counts = collective_seconds(8.0 * shape.config.moe_experts, ranks=plan.ep, link=link, kind="all_to_all")
    forward, backward = ep_exchanges_per_layer(plan)
    return forward * one + counts, backward * one + (backward - 2.0) / 2.0 * counts


def dp_step_seconds(plan: Plan, units: list[Unit], *, cluster: Cluster) -> float:
    """Seconds of one step's data-parallel collectives on a rank holding `units`: expert units over edp
    (dp / ep ranks), the rest over dp."""
    dense = [unit for unit in units if not unit.expert]
    experts = [unit for unit in units if unit.expert]
    shard = dense_shard_ranks(plan) if plan.zero > 0 else plan.dp
    seconds = _group_seconds(
        plan, dense, ranks=shard, link=cluster.collective_link(shard, stride=plan.tp), cluster=cluster
    )
    if shard < plan.dp:
        seconds += _replica_seconds(plan, dense, shard=shard, cluster=cluster)
    if experts:
        edp = plan.dp // plan.ep
        link = cluster.collective_link(edp, stride=plan.tp * plan.ep)
        seconds += _group_seconds(plan, experts, ranks=edp, link=link, cluster=cluster)
    return seconds


def _replica_seconds(plan: Plan, units: list[Unit], *, shard: int, cluster: Cluster) -> float:
    """Hybrid sharding: after each gradient reduction inside the shard group, the all-reduce of each
    unit's fp32 gradient shard over the dp / shard replicas (once per step at stage 1 and under a pipeline,
    per micro-batch otherwise, as `_group_seconds` reduces)."""
    replicas = plan.dp // shard
    link = cluster.collective_link(replicas, stride=plan.tp * shard)
    reductions = 1 if plan.zero == 1 or plan.pp > 1 else plan.microbatches
    shards = [4.0 * math.ceil(unit.local(plan.tp) / shard) for unit in units]
    return reductions * sum(collective_seconds(b, ranks=replicas, link=link, kind="all_reduce") for b in shards)


def _group_seconds(plan: Plan, units: list[Unit], *, ranks: int, link: Link, cluster: Cluster) -> float:
    """Seconds of the collectives over one group of `ranks` that reduce (and gather) these units."""
    if ranks == 1 or not units:
        return 0.0
    numels = [unit.local(plan.tp) for unit in units]
    grad_bytes = [4.0 * n for n in numels]  # plait's named precisions reduce in fp32
    param_bytes = [(2.0 if plan.precision != "fp32" else 4.0) * n for n in numels]
    m = plan.microbatches

    def each(sizes: list[float], kind: str) -> float:
        return sum(collective_seconds(b, ranks=ranks, link=link, kind=kind) for b in sizes)

    if plan.zero == 0 and plan.precision == "fp32":
        bucket = plan.bucket_mb * MB
        buckets = max(1, math.ceil(sum(grad_bytes) / bucket))
        return each([sum(grad_bytes) / buckets] * buckets, "all_reduce")
    if plan.zero == 0:  # stage 1's layout, unsharded: all-reduced once per step
        return each(grad_bytes, "all_reduce")
    reduce_kind = _reduce_kind(plan, cluster)
    if plan.zero == 1:
        return each(grad_bytes, reduce_kind) + each(param_bytes, "all_gather")
    reductions = 1 if plan.pp > 1 else m  # a pipeline defers the reduction to the step's end
    if plan.zero == 2:
        return reductions * each(grad_bytes, reduce_kind) + each(param_bytes, "all_gather")
    gathers = 1 if plan.zero3_gathers_once_per_step else 2 * m  # around each micro-batch's forward and backward
    return reductions * each(grad_bytes, reduce_kind) + gathers * each(param_bytes, "all_gather")
