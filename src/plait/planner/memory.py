"""Bytes per rank of a plan: model states, activations, working memory and communication buffers.

Model states follow plait's ZeRO (closing notes of the ZeRO strand), per
parameter element with fp32 Adam (8 bytes of moments) on N dp ranks:

    fp32:  stage 0 16P, 1: 8P + 8P/N, 2: 4P + 12P/N, 3: 16P/N
    bf16:  stage 0 20P, 1: 4P + 16P/N, 2: 2P + 16P/N, 3: 16P/N   (fp16 the same)

(bf16 keeps the paper's 16P, 4P+12P/N, 2P+14P/N plus an fp32 gradient
shard; at stage 3 the paper's 16P/N: the fp32 master, gradient shard and
moments, the 16-bit parameters existing only while gathered, as in FSDP.)
Flat units are padded to a multiple of N, every Adam parameter holds a
4-byte step, and under tp each rank counts only its shard of the split
weights. `zero_paper_bytes` gives the ZeRO paper's formulas themselves.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from plait.config import Plan
from plait.planner.activations import FP32, head_working_bytes, layer_activations, ring_working_bytes
from plait.planner.layout import StageLayout
from plait.planner.plan_model import PlanModel
from plait.planner.shape import Unit
from plait.planner.workload import PARAM_BYTES

ADAM_BYTES = 8


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on the busiest rank at its peak.

    `params` are the parameters the model computes with, `master` the fp32
    copies the optimizer steps on (bf16/fp16 only), `activations` what the
    layers keep for backward, `working` the transient buffers of the phase
    that peaks (loss, recomputation, gradients in flight), `comm` the
    communication buffers live then (ZeRO-3's gathered units, tensor-parallel
    copies). `tensors` is what live-tensor counting sees; `reserved` is the
    runtime's (CUDA context, allocator slack), outside any tensor. `host` and
    `disk` are the bytes an offloading plan keeps off the device (its states
    and their staging buffers); `total` is device memory alone.
    """

    params: float
    master: float
    grads: float
    optimizer: float
    activations: float
    working: float
    comm: float
    reserved: float = 0.0
    stage: int = 0
    host: float = 0.0
    disk: float = 0.0

    @property
    def model_states(self) -> float:
        return self.params + self.master + self.grads + self.optimizer

    @property
    def tensors(self) -> float:
        return self.model_states + self.activations + self.working + self.comm

    @property
    def total(self) -> float:
        return self.tensors + self.reserved

    def as_dict(self) -> dict[str, float]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return out | {"model_states": self.model_states, "tensors": self.tensors, "total": self.total}


def zero_paper_bytes(num_params: float, *, stage: int, dp: int) -> float:
    """The ZeRO paper's model states for mixed-precision Adam: 16P, 4P + 12P/N, 2P + 14P/N, 16P/N."""
    p, n = num_params, dp
    return (16 * p, 4 * p + 12 * p / n, 2 * p + 14 * p / n, 16 * p / n)[stage]


@dataclass(frozen=True)
class Phase:
    """Transient bytes of one part of a step, on top of the activations held then."""

    working: float = 0.0
    comm: float = 0.0


@dataclass(frozen=True)
class StateBytes:
    params: float
    master: float
    grads: float
    optimizer: float


def zero_shards(unit: Unit, plan: Plan) -> int:
    """Ranks a unit's flat state is sharded over: none at stage 0; dp (or plan.zero_shard's group under
    hybrid sharding), or edp (dp / ep) for experts."""
    if plan.zero == 0:
        return 1
    return plan.dp // plan.ep if unit.expert else dense_shard_ranks(plan)


def dense_shard_ranks(plan: Plan) -> int:
    """The dp ranks ZeRO shards a (non-expert) unit over: plan.zero_shard once resolved to a number
    (`with_zero_shard` does it for a cluster), else all of dp, and its cp ranks (weight replicas that
    plait.distributed.mesh folds into dp)."""
    if plan.zero_shard == "node":
        raise ValueError("plan.zero_shard='node' depends on the cluster: resolve it with with_zero_shard first")
    return plan.zero_shard if isinstance(plan.zero_shard, int) else plan.dp * plan.cp


def with_zero_shard(plan: Plan, *, ranks_per_node: int) -> Plan:
    """`plan` with zero_shard='node' replaced by the number of dp ranks one node holds."""
    if plan.zero_shard != "node":
        return plan
    return dataclasses.replace(plan, zero_shard=plan.zero_shard_size(ranks_per_node))


def unit_state_bytes(units: list[Unit], plan: Plan) -> StateBytes:
    """Model states of these units on one rank, as plait's data-parallel strand lays them out (expert
    units hold num_experts / ep experts and shard over edp)."""
    e = PARAM_BYTES[plan.precision]
    if plan.zero == 0 and e == FP32:  # bucketed data parallel: whole params, grads and moments
        total = sum(unit.local(plan.tp) for unit in units)
        tensors = sum(unit.num_tensors for unit in units)
        return StateBytes(FP32 * total, 0.0, FP32 * total, ADAM_BYTES * total + FP32 * tensors)
    padded = shard = pieces = 0.0
    for unit in units:
        shards = zero_shards(unit, plan)
        unit_padded = math.ceil(unit.local(plan.tp) / shards) * shards
        padded += unit_padded
        shard += unit_padded / shards
        pieces += unit.num_tensors / shards + (1 if shards > 1 else 0)
    master = FP32 * shard if e != FP32 else 0.0
    params = e * padded
    if plan.zero == 3:  # the shard alone; in 16 bits that is the master, cast as each gather sends it
        params = 0.0 if e != FP32 else FP32 * shard
    grad_full = e * padded if plan.zero <= 1 else 0.0
    grad_shard = FP32 * shard if (plan.zero >= 2 or e != FP32) else 0.0
    return StateBytes(params, master, grad_full + grad_shard, ADAM_BYTES * shard + FP32 * pieces)


def held_through_schedule(units: list[Unit], plan: Plan) -> Phase:
    """What a rank holds from its first micro-batch to the step's reduction, on top of its model states:
    under a pipeline ZeRO-2/3 accumulate every micro-batch's gradients in full (in the parameters' dtype) and
    reduce-scatter each unit once after the schedule; ZeRO-3 gathering once per step (`zero3_gather`) keeps
    each unit's whole parameters from its first use to that reduction."""
    local = sum(unit.local(plan.tp) for unit in units)
    e = PARAM_BYTES[plan.precision]
    grads = e * local if plan.pp > 1 and plan.zero >= 2 else 0.0
    gathered = e * local if plan.zero == 3 and plan.zero3_gathers_once_per_step else 0.0
    return Phase(working=grads, comm=gathered)


class MemoryModel(PlanModel):
    """Estimates `MemoryBreakdown`s; holds a cache of simulated schedules for a search."""

    def estimate(self, plan: Plan, *, reserved: float = 0.0) -> MemoryBreakdown:
        """The busiest pipeline rank's breakdown (every rank's when pp == 1)."""
        layout = self.layouts.get(plan)
        in_flight = self._in_flight(plan)
        stages = [
            self._stage(plan, layout, stage=stage, in_flight=in_flight[stage], reserved=reserved)
            for stage in range(plan.pp)
        ]
        return max(stages, key=lambda m: m.total)

    def _in_flight(self, plan: Plan) -> tuple[float, ...]:
        """Micro-batches' worth of a rank's layers held at once: 1 without pp; the schedule's peak otherwise."""
        if plan.pp == 1:
            return (1.0,)
        return self.schedules.timing(plan).in_flight

    def _stage(
        self, plan: Plan, layout: StageLayout, *, stage: int, in_flight: float, reserved: float
    ) -> MemoryBreakdown:
        layers = layout.layer_indices(stage)
        units = self.shape.stage_units(stage, num_layers=len(layers), pp=plan.pp, tp=plan.tp, ep=plan.ep,
                                       layers=layers)  # fmt: skip
        states = unit_state_bytes(units, plan)
        mb = self.workload.micro_batch(dp=plan.dp, microbatches=plan.microbatches)
        e = PARAM_BYTES[plan.precision]
        by_kind = {
            moe: self._layer_bytes(plan, mb, e, moe=moe) for moe in {self.shape.config.is_moe_layer(i) for i in layers}
        }
        per_layer = [by_kind[self.shape.config.is_moe_layer(i)] for i in layers]
        hidden = mb * self.workload.seq_len // plan.cp * self.shape.hidden * e  # a cp rank's tokens
        is_last = stage == plan.pp - 1
        activations = in_flight * sum(saved for saved, _ in per_layer) + (2 * hidden if is_last else 0.0)
        ring = ring_working_bytes(self.shape, micro_batch=mb, seq_len=self.workload.seq_len, tp=plan.tp, cp=plan.cp)
        # Under sp the column layers' input, whole: re-gathered while a layer's backward runs, and the
        # last one entered held by the shared entry until that layer's backward (so through the head's).
        gathered = hidden if plan.sequence_parallel and plan.tp > 1 else 0.0
        phases = [self._layer_phase(plan, units, max(working for _, working in per_layer) + ring + gathered)]
        if is_last:
            head = self._head_phase(plan, mb, e)
            phases.append(Phase(working=head.working + gathered, comm=head.comm))
        if stage == 0 and plan.pp > 1:  # pipeline transfers land in a stage's input, counted as activations
            phases.append(Phase(working=self._embedding_phase(plan, hidden)))
        if plan.pp > 1 and plan.zero >= 2:
            phases.append(self._deferred_reduction_phase(plan, units, activations))
        held = held_through_schedule(units, plan)
        phases = [Phase(working=p.working + held.working, comm=p.comm + held.comm) for p in phases]
        optimizer_step = 2 * FP32 * max(unit.local(plan.tp) / zero_shards(unit, plan) for unit in units)
        phases.append(Phase(working=optimizer_step - activations))  # no activations left by then
        peak = max(phases, key=lambda phase: phase.working + phase.comm)
        return MemoryBreakdown(
            params=states.params,
            master=states.master,
            grads=states.grads,
            optimizer=states.optimizer,
            activations=activations,
            working=peak.working,
            comm=peak.comm,
            reserved=reserved,
            stage=stage,
        )

    def _head_phase(self, plan: Plan, micro_batch: int, e: int) -> Phase:
        """The loss's backward: the peak of a model whose vocabulary is large next to its width. Under tp
        the gradient of the head's input leaves the tensor-parallel region through a collective that
        works on a fresh copy: two hidden-sized buffers more, three under sequence parallel (the
        reduce-scatter also copies its full input to a contiguous buffer). gloo runs these collectives
        on threads of its own, so where their buffers fall in the peak varies from step to step
        (measured: +-5% of the peak under sequence parallel)."""
        loss = head_working_bytes(
            self.shape, micro_batch=micro_batch, seq_len=self.workload.seq_len, element_bytes=e, tp=plan.tp,
            logits_kept=plan.pp == 1, cp=plan.cp,
        )  # fmt: skip
        copies = (3 if plan.sequence_parallel else 2) if plan.tp > 1 else 0
        exit_grads = copies * micro_batch * self.workload.seq_len // plan.cp * self.shape.hidden * e
        return Phase(working=loss, comm=exit_grads)

    def _embedding_phase(self, plan: Plan, hidden: float) -> float:
        """A first pipeline stage's embedding backward, while later micro-batches are in flight:
        the dense gradient of the (vocab-parallel) table, and the gradient arriving from stage 1."""
        return self.shape.vocab_rows(plan.tp) * self.shape.hidden * PARAM_BYTES[plan.precision] + hidden

    def _layer_phase(self, plan: Plan, units: list[Unit], recomputed: float) -> Phase:
        """A layer's backward: its recomputed activations, and under ZeRO stage 3's gathered units (the
        one in use and the prefetched one) and stage 2-3's reduction of each unit's gradients as backward
        makes them (the unit's own gradients plus up to three flat fp32 buffers in flight:
        `MAX_IN_FLIGHT` and the one just launched)."""
        if plan.zero < 2:
            return Phase(working=recomputed)
        largest = sorted(unit.local(plan.tp) for unit in units)[-2:]
        e = PARAM_BYTES[plan.precision]
        per_unit = plan.zero == 3 and not plan.zero3_gathers_once_per_step  # else `held_through_schedule`'s
        gathered = e * sum(largest) if per_unit else 0.0
        if plan.pp > 1:  # reductions deferred to the schedule's end (`_deferred_reduction_phase`)
            return Phase(working=recomputed, comm=gathered)
        return Phase(working=recomputed + largest[-1] * e, comm=gathered + 3 * FP32 * largest[-1])

    def _deferred_reduction_phase(self, plan: Plan, units: list[Unit], activations: float) -> Phase:
        """Under a pipeline, ZeRO-2/3's reduction after the schedule: every unit's fp32 flat buffers in flight
        (`MAX_IN_FLIGHT` and the one just launched) while the whole gradients wait; no activations left."""
        largest = max(unit.local(plan.tp) for unit in units)
        return Phase(working=-activations, comm=3 * FP32 * largest)

    def _layer_bytes(self, plan: Plan, micro_batch: int, e: int, *, moe: bool = False) -> tuple[float, float]:
        """(saved, working) per layer, averaging selective recomputation's recomputed fraction of layers."""
        kwargs = {
            "moe": moe,
            "micro_batch": micro_batch,
            "seq_len": self.workload.seq_len,
            "element_bytes": e,
            "tp": plan.tp,
            "sp": plan.sequence_parallel,
            "profile": self.profile,
            "cp": plan.cp,
        }
        if plan.recompute != "selective" or self.profile == "megatron":
            act = layer_activations(self.shape, recompute=plan.recompute, **kwargs)
            return act.saved, act.working
        kept = layer_activations(self.shape, recompute="none", **kwargs)
        redone = layer_activations(self.shape, recompute="full", **kwargs)
        ratio = plan.recompute_ratio
        return (1 - ratio) * kept.saved + ratio * redone.saved, redone.working
