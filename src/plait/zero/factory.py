"""Choose and build the data-parallel strand a plan asks for."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch
import torch.distributed as dist
from torch import nn

from plait.amp.policy import PrecisionPolicy
from plait.config import Plan
from plait.distributed.comm import CommCounter
from plait.distributed.mesh import Mesh
from plait.zero.data_parallel import DataParallel, broadcast_module_state
from plait.zero.lazy import Materializer
from plait.zero.offload.build import build_offload
from plait.zero.partition import plan_units
from plait.zero.sharded import ZeroDataParallel
from plait.zero.unit import UnitConfig


def use_all_reduce(plan: Plan, group: dist.ProcessGroup | None) -> bool:
    """gloo's all-reduce beats its reduce-scatter (64 MB at world 2: 0.09 s vs 0.16 s, FACTS.md);
    the bytes kept per rank are the same either way, only the traffic differs."""
    if plan.reduce_op != "auto":
        return plan.reduce_op == "all_reduce"
    return group is None or dist.get_backend(group) == "gloo"


def unit_numels(model: nn.Module) -> list[int]:
    specs, _ = plan_units(model)
    return [sum(param.numel() for _, param in spec.named_params) for spec in specs]


def build_data_parallel(
    model: nn.Module,
    *,
    mesh: Mesh,
    policy: PrecisionPolicy,
    counter: CommCounter,
    expert_params: Collection[nn.Parameter] = (),
) -> DataParallel | ZeroDataParallel:
    """Plain bucketed data parallel for fp32 stage 0; flat dp-sharded units otherwise.

    `expert_params` (expert parallel: each rank holds some experts) are reduced, sharded and
    broadcast over the edp group, the ranks holding the same experts; the rest over dp.
    """
    plan = mesh.plan
    is_lazy = any(p.is_meta for p in model.parameters())
    if is_lazy and plan.zero != 3:
        raise ValueError(
            f"the model is on the meta device but plan.zero={plan.zero}; lazy initialisation needs plan.zero=3, or build the model on a real device"
        )
    offload = (
        build_offload(unit_numels(model), mesh=mesh, policy=policy) if plan.offloads else None
    )  # before collectives
    if plan.zero == 0 and policy.param_dtype == torch.float32:
        return DataParallel(model, mesh=mesh, bucket_mb=plan.bucket_mb, counter=counter, expert_params=expert_params)
    if not is_lazy:
        broadcast_module_state(model, mesh=mesh, expert_params=expert_params)
    config = _unit_config(mesh, policy=policy, counter=counter, axis="dp")
    config = dataclasses.replace(
        config, copy_stream=torch.cuda.Stream() if offload is not None and mesh.device_type == "cuda" else None
    )
    expert_config = _unit_config(mesh, policy=policy, counter=counter, axis="edp") if expert_params else None
    device = torch.device(mesh.device_type)
    materialize = Materializer(model, device=device) if is_lazy else None
    zero = ZeroDataParallel(
        model,
        config=config,
        materialize=materialize,
        offload=offload,
        expert_config=expert_config,
        expert_params=expert_params,
    )
    zero.defer_reduction = mesh.size("pp") > 1
    zero.gather_once_per_step = plan.zero3_gathers_once_per_step
    return zero


def _unit_config(mesh: Mesh, *, policy: PrecisionPolicy, counter: CommCounter, axis: str) -> UnitConfig:
    """Flat units sharded over `axis` (dp, or edp for expert-parallel parameters); under hybrid sharding
    (plan.zero_shard) dp's units are sharded over zshard and their gradient shards summed over zrep."""
    plan = mesh.plan
    hybrid = axis == "dp" and mesh.size("zrep") > 1
    shard_axis = "zshard" if hybrid else axis
    group = mesh.group(shard_axis)
    sharded = plan.zero > 0
    return UnitConfig(
        stage=max(plan.zero, 1),  # stage 0 in mixed precision: stage 1's layout, unsharded
        param_dtype=policy.param_dtype,
        reduce_dtype=policy.reduce_dtype,
        group=group,
        num_shards=mesh.size(shard_axis) if sharded else 1,
        shard_index=mesh.rank(shard_axis) if sharded else 0,
        use_all_reduce=use_all_reduce(plan, group) or not sharded,
        counter=counter,
        axis=shard_axis,
        replica_group=mesh.group("zrep") if hybrid else None,
    )
