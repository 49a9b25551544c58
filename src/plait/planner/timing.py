"""Seconds per training step of a plan on a cluster.

step = pipeline makespan of the busiest stage's forward and backward passes
       (bubbles from plait's own schedule simulator, p2p time between stages)
     + data-parallel traffic that backward does not hide
     + the optimizer step.

A pass costs its matmul FLOPs at `peak_flops * gemm_efficiency`, plus its
element-wise traffic (about twice the activation bytes it writes: each
element-wise op reads its input and writes its output) over memory bandwidth,
plus `op_overhead` per operator, plus its tensor-parallel collectives and
expert-parallel all-to-alls (`comm.py`). Backward is twice a forward; full
recomputation adds one more forward. An MoE layer computes with its active
weights (router, top_k experts, shared experts).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

from plait.config import Plan
from plait.planner.activations import FP32, layer_activations
from plait.planner.cluster import Cluster
from plait.planner.comm import (
    collective_seconds,
    dp_step_seconds,
    ep_layer_seconds,
    moe_tp_layer_seconds,
    tp_layer_seconds,
)
from plait.planner.layout import StageLayout
from plait.planner.memory import ADAM_BYTES, unit_state_bytes
from plait.planner.plan_model import PlanModel
from plait.planner.shape import Unit
from plait.planner.workload import PARAM_BYTES, Workload

OPS_PER_LAYER = 30  # operators one layer's forward launches (norms, projections, attention, MLP, residuals)
MOE_OPS_PER_EXPERT = 6  # operators per local expert (slice, up, activation, down, ...): experts run one by one
OPTIMIZER_PASSES = 12  # fp32 arrays AdamW reads or writes per element (moments, master, grad, temporaries)
OPTIMIZER_OPS_PER_TENSOR = 12


@dataclass(frozen=True)
class TimeBreakdown:
    """Seconds per step on the busiest rank; `total` is the step time. `offload_io` is the offload
    traffic compute does not hide (see `plait.planner.offload_apply`), `io` all of it."""

    compute: float
    tp_comm: float
    bubble: float
    pp_comm: float
    dp_comm_exposed: float
    optimizer: float
    dp_comm: float = 0.0
    offload_io: float = 0.0
    io: float = 0.0
    ep_comm: float = 0.0  # expert-parallel all-to-alls, on the critical path (tokens wait for them)
    cp_comm: float = 0.0  # context parallel's ring hops (key/value blocks, their gradients' accumulators)

    @property
    def total(self) -> float:
        return (
            self.compute + self.tp_comm + self.ep_comm + self.cp_comm + self.bubble + self.pp_comm
            + self.dp_comm_exposed + self.optimizer + self.offload_io
        )  # fmt: skip

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


@dataclass(frozen=True)
class PassCost:
    """One micro-batch through one pipeline rank's layers: forward and backward seconds (compute, tp comm)."""

    forward: float
    backward: float
    tp_forward: float
    tp_backward: float
    ep_forward: float = 0.0
    ep_backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.tp_forward + self.tp_backward + self.ep_forward + self.ep_backward


@dataclass(eq=False)
class TimeModel(PlanModel):
    """Estimates `TimeBreakdown`s of plans on `cluster`."""

    cluster: Cluster = field(kw_only=True)

    def estimate(self, plan: Plan) -> TimeBreakdown:
        if plan.cp > 1:
            return self._context_parallel(plan)
        layout = self.layouts.get(plan)
        costs = [
            self._pass(plan, layout.layer_indices(r), is_first=r == 0, is_last=r == plan.pp - 1) for r in range(plan.pp)
        ]
        slowest = max(costs, key=lambda c: c.total)
        fwd = slowest.forward + slowest.tp_forward + slowest.ep_forward
        bwd = slowest.backward + slowest.tp_backward + slowest.ep_backward
        m = plan.microbatches
        busy = m * (fwd + bwd)
        makespan, pp_comm = busy, 0.0
        if plan.pp > 1:
            makespan, pp_comm = self._pipeline(plan, fwd, bwd)
            speedup = self._core_speedup(busy / makespan)
            busy, makespan, fwd_scale = busy / speedup, makespan / speedup, 1 / speedup
        else:
            fwd_scale = 1.0
        dp_comm, hidden_by = self._dp_comm(plan, layout), m * slowest.backward
        exposed = max(dp_comm - self.cluster.overlap * hidden_by, (1 - self.cluster.overlap) * dp_comm)
        return TimeBreakdown(
            compute=m * (slowest.forward + slowest.backward) * fwd_scale,
            tp_comm=m * (slowest.tp_forward + slowest.tp_backward) * fwd_scale,
            ep_comm=m * (slowest.ep_forward + slowest.ep_backward) * fwd_scale,
            bubble=max(0.0, makespan - busy - pp_comm),
            pp_comm=pp_comm,
            dp_comm_exposed=exposed,
            optimizer=self._optimizer(plan, layout),
            dp_comm=dp_comm,
        )

    def _context_parallel(self, plan: Plan) -> TimeBreakdown:
        """cp ranks hold weight replicas (plait.distributed.mesh folds them into dp for every reduction and
        ZeRO shard) and each computes 1/cp of every sequence's tokens against all of its keys: the same
        work and collectives as dp x cp data-parallel ranks, plus the ring's hops per layer."""
        folded = dataclasses.replace(plan, dp=plan.dp * plan.cp, cp=1)
        base = self._folded(folded, cp=plan.cp)
        c, cfg = self.cluster, self.shape.config
        tokens = self.workload.micro_batch(dp=plan.dp, microbatches=plan.microbatches) * self.workload.seq_len / plan.cp
        block = 2 * tokens * cfg.resolved_num_kv_heads * cfg.head_dim * FP32 / plan.tp  # stack(k, v) in fp32
        link = c.link(plan.cp, stride=plan.tp)
        hop = block / link.bandwidth + link.latency
        recomputed = {"full": 1.0, "selective": plan.recompute_ratio}.get(plan.recompute, 0.0)
        # forward: cp - 1 hops of k/v; backward: k/v again and cp - 1 hops of their gradients' accumulator
        # (the owner keeps its own block's share, so the accumulator starts one rank on)
        hops = (1 + recomputed) * (plan.cp - 1) + 2 * (plan.cp - 1)
        num_layers = max(len(self.layouts.get(plan).layer_indices(r)) for r in range(plan.pp))
        ring = plan.microbatches * num_layers * hops * hop
        return dataclasses.replace(base, cp_comm=ring)

    def _folded(self, folded: Plan, *, cp: int) -> TimeBreakdown:
        """The dp x cp fold gives each folded rank b / cp sequences per micro-batch, fewer than one when the
        micro-batch b is smaller than cp (long-context runs use b = 1): estimated on a batch `widen` times
        larger, so that the folded micro-batch is whole, then the per-micro-batch terms (linear in tokens)
        taken back to the rank's b x seq / cp tokens; the gradient reduction and the optimizer do not
        depend on tokens, and the share of the reduction that backward hides shrinks with it."""
        b = self.workload.micro_batch(dp=folded.dp // cp, microbatches=folded.microbatches)
        widen = cp // math.gcd(b, cp)
        if widen == 1:
            return self.estimate(folded)
        wide = Workload(self.workload.global_batch * widen, self.workload.seq_len, clips=self.workload.clips)
        model = TimeModel(
            self.shape, wide, cluster=self.cluster, profile=self.profile, layouts=self.layouts, schedules=self.schedules
        )
        base = model.estimate(folded)
        hidden = (base.dp_comm - base.dp_comm_exposed) / widen
        exposed = max(base.dp_comm - hidden, (1 - self.cluster.overlap) * base.dp_comm)
        per_token = ("compute", "tp_comm", "ep_comm", "bubble", "pp_comm")
        return dataclasses.replace(
            base, dp_comm_exposed=exposed, **{name: getattr(base, name) / widen for name in per_token}
        )

    def _core_speedup(self, busy_fraction: float) -> float:
        """Ranks sharing cores: with only `busy_fraction` of them computing at a time (the rest wait in
        pipeline bubbles), each gets min(1, share / busy_fraction) of a core instead of `core_share`."""
        share = self.cluster.core_share
        return min(1.0, share / max(busy_fraction, 1e-9)) / share

    # --- compute ---

    def _pass(self, plan: Plan, layers: list[int], *, is_first: bool, is_last: bool) -> PassCost:
        c, s = self.cluster, self.workload.seq_len
        mb = self.workload.micro_batch(dp=plan.dp, microbatches=plan.microbatches)
        tokens = mb * s
        e = PARAM_BYTES[plan.precision]
        num_moe = sum(self.shape.config.is_moe_layer(i) for i in layers)
        dense, moe = self._layer_seconds(plan, mb, moe=False), self._layer_seconds(plan, mb, moe=True)
        head = 0.0
        if is_last:
            head_flops = tokens * self.shape.head_flops_per_token(tp=plan.tp)
            logits = tokens * self.shape.vocab_rows(plan.tp) * (e + 3 * FP32)
            head = head_flops / (c.peak_flops * c.gemm_efficiency) + 2 * logits / c.memory_bandwidth
        recomputed = {"full": 1.0, "selective": plan.recompute_ratio}.get(plan.recompute, 0.0)
        if self.profile == "megatron" and plan.recompute == "selective":
            recomputed = 0.0  # only the attention scores, already inside the element-wise traffic
        layer_seconds = (len(layers) - num_moe) * dense + num_moe * moe
        forward = layer_seconds + head
        backward = 2 * forward + recomputed * layer_seconds
        hidden_bytes = tokens * self.shape.hidden * e
        columns = 1 if self.shape.config.parallel_block else 2  # the region is entered once per norm output
        tp_fwd, tp_bwd = tp_layer_seconds(
            plan, hidden_bytes, columns=columns, cluster=c, staged=self.profile == "plait"
        )
        moe_fwd, moe_bwd = (
            moe_tp_layer_seconds(self.shape, plan, hidden_bytes, tokens=tokens, cluster=c) if num_moe else (0.0, 0.0)
        )
        tp_ends = self._tp_ends(plan, hidden_bytes, tokens, is_first=is_first, is_last=is_last)
        ep_fwd, ep_bwd = ep_layer_seconds(self.shape, plan, tokens=tokens, cluster=c)
        num_dense = len(layers) - num_moe
        return PassCost(
            forward, backward, num_dense * tp_fwd + num_moe * moe_fwd + tp_ends,
            num_dense * (tp_bwd + recomputed * tp_fwd) + num_moe * (moe_bwd + recomputed * moe_fwd) + tp_ends,
            num_moe * ep_fwd, num_moe * ep_bwd,
        )  # fmt: skip

    def _layer_seconds(self, plan: Plan, micro_batch: int, *, moe: bool) -> float:
        """Forward seconds of one layer (dense or MoE) for one micro-batch: matmuls, element-wise, launches."""
        c, s = self.cluster, self.workload.seq_len
        if moe and not self.shape.config.moe_experts:
            return 0.0
        flops = micro_batch * s * self.shape.layer_flops_per_token(s, tp=plan.tp, moe=moe)
        act = layer_activations(
            self.shape, micro_batch=micro_batch, seq_len=s, element_bytes=PARAM_BYTES[plan.precision], tp=plan.tp,
            sp=plan.sequence_parallel, profile=self.profile, moe=moe,
        )  # fmt: skip
        ops = OPS_PER_LAYER + (MOE_OPS_PER_EXPERT * self.shape.config.moe_experts // plan.ep if moe else 0)
        matmul = flops / (c.peak_flops * c.gemm_efficiency)
        if c.attention_flops:  # the fused attention kernel at its own measured rate
            attention = micro_batch * s * 4.0 * s * self.shape.hidden / plan.tp
            matmul += attention / c.attention_flops - attention / (c.peak_flops * c.gemm_efficiency)
        return matmul + 2 * act.saved / c.memory_bandwidth + ops * c.op_overhead

    def _tp_ends(self, plan: Plan, hidden_bytes: float, tokens: int, *, is_first: bool, is_last: bool) -> float:
        """The vocab-parallel ends: the embedding's all-reduce on the first stage; on the last, the head
        input's gradient all-reduce and the loss's three all-reduces of one fp32 value per token."""
        if plan.tp == 1:
            return 0.0
        link = self.cluster.link(plan.tp)
        one = collective_seconds(hidden_bytes, ranks=plan.tp, link=link, kind="all_reduce")
        loss = 3 * collective_seconds(FP32 * tokens, ranks=plan.tp, link=link, kind="all_reduce")
        return (one if is_first else 0.0) + (one + loss if is_last else 0.0)

    # --- pipeline ---

    def _pipeline(self, plan: Plan, forward: float, backward: float) -> tuple[float, float]:
        mb = self.workload.micro_batch(dp=plan.dp, microbatches=plan.microbatches)
        message = mb * self.workload.seq_len * self.shape.hidden * PARAM_BYTES[plan.precision]
        link = self.cluster.link(plan.pp, stride=plan.dp * plan.tp)
        send = message / link.bandwidth + link.latency
        v = plan.pp_chunks
        makespan = self.schedules.timing(plan, forward=forward / v, backward=backward / v).makespan
        hops = 2 * (plan.pp * v - 1)  # the critical path crosses every stage boundary forward and back
        return makespan + hops * send, hops * send

    # --- data parallel and optimizer ---

    def _busiest_units(self, plan: Plan, layout: StageLayout) -> list[Unit]:
        """The first stage's units with the busiest rank's layers (the first stage also holds the embedding)."""
        layers = layout.layer_indices(layout.busiest_rank())
        return self.shape.stage_units(0, num_layers=len(layers), pp=plan.pp, tp=plan.tp, ep=plan.ep, layers=layers)

    def _dp_comm(self, plan: Plan, layout: StageLayout) -> float:
        return dp_step_seconds(plan, self._busiest_units(plan, layout), cluster=self.cluster)

    def _optimizer(self, plan: Plan, layout: StageLayout) -> float:
        units = self._busiest_units(plan, layout)
        states = unit_state_bytes(units, plan)
        elements = (states.optimizer) / ADAM_BYTES
        num_tensors = sum(unit.num_tensors for unit in units)
        c = self.cluster
        per_tensor = num_tensors * OPTIMIZER_OPS_PER_TENSOR * c.op_overhead
        if c.host_is_device:  # CPU ranks: the optimizer is the host's AdamW, at its calibrated rate
            return elements / c.host_adam_rate + per_tensor
        return elements * OPTIMIZER_PASSES * FP32 / c.memory_bandwidth + per_tensor
