"""Expert parallel on a model: each ep rank keeps its slice of every MoE layer's experts.

Ep rank r of ep holds experts ``[r * E / ep, (r + 1) * E / ep)``: rows of each stacked
expert tensor, under the same names, with a placement record (``dim_shards=(("ep", 0),)``)
that tells clipping and checkpoints they are a slice of dim 0. Tokens reach them through
``AllToAllDispatch``. Routers and shared experts stay replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.comm import CommCounter
from plait.distributed.placement import Placement, placement_of, set_placement
from plait.moe.all_to_all import AllToAllDispatch, Exchange
from plait.moe.config import MoEConfig
from plait.moe.experts import Experts
from plait.moe.model import expert_parameters, moe_layers


def check_expert_parallel(model: nn.Module, ep: int) -> None:
    """Refuse a model whose MoE layers cannot split over ``ep`` ranks (before any collective)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(
            f"plan.ep={ep} splits the experts of MoE layers, but the model has none; set plan.ep=1, or build an "
            "MoE model (e.g. preset 'switch-tiny')"
        )
    for name, layer in layers:
        experts = layer.config.num_experts
        if experts % ep:
            raise ValueError(
                f"{name} has {experts} experts, which do not split over plan.ep={ep} ranks; choose an ep that "
                f"divides {experts}"
            )


def apply_expert_parallel(model: nn.Module, *, exchange: Exchange) -> None:
    """Keep this ep rank's experts (sliced from the full layers) and dispatch tokens by all-to-all."""
    check_expert_parallel(model, exchange.size)
    for _, layer in moe_layers(model):
        count = layer.config.num_experts // exchange.size
        layer.experts = slice_experts(layer.experts, config=layer.config, first=exchange.rank * count, count=count)
        layer.dispatch = AllToAllDispatch(exchange, num_local_experts=count)
    for name, param in expert_parameters(model):
        base = placement_of(param) or Placement(name=name, global_shape=())
        global_shape = (param.shape[0] * exchange.size, *param.shape[1:])
        set_placement(param, Placement(name=name, global_shape=global_shape, dim_shards=(*base.dim_shards, ("ep", 0))))


@torch.no_grad()
def slice_experts(full: Experts, *, config: MoEConfig, first: int, count: int) -> Experts:
    """An ``Experts`` holding rows ``[first, first + count)`` of ``full``'s copied (meta stays meta)."""
    with torch.device("meta"):  # placeholders: every parameter is replaced by its slice below
        part = Experts(config, first_expert=first, num_local_experts=count)
    offset = first - full.first_expert
    for name, param in full.named_parameters(recurse=False):
        rows = param[offset : offset + count].clone()
        setattr(part, name, nn.Parameter(rows, requires_grad=param.requires_grad))
    return part


def gather_experts(state: dict[str, torch.Tensor], model: nn.Module, *, group: dist.ProcessGroup | None) -> None:
    """Replace each expert tensor of a full state dict by its concatenation over the ep group (in place)."""
    if group is None:
        return
    size = dist.get_world_size(group)
    for name, _ in expert_parameters(model):
        local = state[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local, group=group)
        state[name] = torch.cat(parts)


def count_exchange_bytes(counter: CommCounter | None) -> float:
    """Bytes this rank sent in expert-parallel all-to-alls since the counter's last reset."""
    if counter is None:
        return 0.0
    return sum(value for (op, axis, _), value in counter.sent.items() if op == "all_to_all" and axis == "ep")
