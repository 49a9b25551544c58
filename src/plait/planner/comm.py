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
- With sequence parallel each entry all-gathers the sequence and every
  row-parallel projection reduce-scatters its output; backward swaps them.
"""

from __future__ import annotations

import math

from plait.config import Plan
from plait.planner.cluster import Cluster, Link
from plait.planner.shape import Unit

MB = 2**20


def _ring_steps(kind: str, ranks: int) -> int:
    return 2 * (ranks - 1) if kind == "all_reduce" else ranks - 1


def collective_seconds(num_bytes: float, *, ranks: int, link: Link, kind: str) -> float:
    """With a measured table: the all-reduce time of that buffer, scaled by ring steps to this kind and
    group size; otherwise the ring model. Either way times the link's factor for the kind."""
    if ranks == 1 or num_bytes == 0:
        return 0.0
    steps = _ring_steps(kind, ranks)
    if link.table:
        measured = link.all_reduce_table_seconds(num_bytes)
        seconds = measured * steps / _ring_steps("all_reduce", link.table_ranks)
    else:
        seconds = steps / ranks * num_bytes / link.bandwidth + steps * link.latency
    return seconds * link.scale(kind)


def tp_layer_seconds(plan: Plan, hidden_bytes: float, *, columns: int, cluster: Cluster) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's tensor-parallel collectives for one micro-batch;
    `columns` is how many column-parallel projections take the layer's input separately."""
    if plan.tp == 1:
        return 0.0, 0.0
    link = cluster.link(plan.tp)

    def cost(kind: str) -> float:
        return collective_seconds(hidden_bytes, ranks=plan.tp, link=link, kind=kind)

    if plan.sequence_parallel:
        return columns * cost("all_gather") + 2 * cost("reduce_scatter"), columns * cost("reduce_scatter") + 2 * cost(
            "all_gather"
        )
    return 2 * cost("all_reduce"), columns * cost("all_reduce")


def _reduce_kind(plan: Plan, cluster: Cluster) -> str:
    if plan.reduce_op != "auto":
        return plan.reduce_op
    return "all_reduce" if cluster.backend == "gloo" else "reduce_scatter"


def dp_step_seconds(plan: Plan, units: list[Unit], *, cluster: Cluster) -> float:
    """Seconds of one step's data-parallel collectives on a rank holding `units`."""
    if plan.dp == 1:
        return 0.0
    link = cluster.link(plan.dp, stride=plan.tp)
    numels = [unit.local(plan.tp) for unit in units]
    grad_bytes = [4.0 * n for n in numels]  # plait's named precisions reduce in fp32
    param_bytes = [(2.0 if plan.precision != "fp32" else 4.0) * n for n in numels]
    m = plan.microbatches

    def each(sizes: list[float], kind: str) -> float:
        return sum(collective_seconds(b, ranks=plan.dp, link=link, kind=kind) for b in sizes)

    if plan.zero == 0 and plan.precision == "fp32":
        bucket = plan.bucket_mb * MB
        buckets = max(1, math.ceil(sum(grad_bytes) / bucket))
        return each([sum(grad_bytes) / buckets] * buckets, "all_reduce")
    if plan.zero == 0:  # stage 1's layout, unsharded: all-reduced once per step
        return each(grad_bytes, "all_reduce")
    reduce_kind = _reduce_kind(plan, cluster)
    if plan.zero == 1:
        return each(grad_bytes, reduce_kind) + each(param_bytes, "all_gather")
    if plan.zero == 2:
        return m * each(grad_bytes, reduce_kind) + each(param_bytes, "all_gather")
    return m * (each(grad_bytes, reduce_kind) + 2 * each(param_bytes, "all_gather"))
