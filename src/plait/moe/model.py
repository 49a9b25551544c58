"""Model-wide handles on MoE layers: find them, set their routing groups and aux-loss scale, read their stats."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plait.moe.experts import Experts
from plait.moe.layer import MoELayer


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """Every MoE layer of ``model`` with its qualified name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)]


def has_moe(model: nn.Module) -> bool:
    """Whether ``model`` has at least one MoE layer."""
    return any(isinstance(module, MoELayer) for module in model.modules())


def set_routing_groups(model: nn.Module, num_groups: int) -> None:
    """Split each MoE layer's input batch into ``num_groups`` routing groups.

    One plain process reproduces a data-parallel run with ``num_groups = dp x
    micro-batches``: each rank's micro-batch is one routing group there, with its own
    capacity, drops and load-balancing statistics.

    Example:
        >>> set_routing_groups(reference_model, plan.dp * plan.microbatches)  # doctest: +SKIP
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    for _, layer in moe_layers(model):
        layer.num_groups = num_groups


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The gradient each MoE layer's weighted auxiliary loss starts its backward with.

    Set it to what the main loss is multiplied by before backward, so the update sees
    ``loss + weight * aux``: 1.0 for a plain ``loss.backward()``; the engine sets
    loss scale / (dp x micro-batches) (see ``Engine._set_moe_aux_scale``).
    """
    for _, layer in moe_layers(model):
        layer.aux_grad_scale = float(scale)


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The experts' stacked parameters by qualified name: dim 0 indexes the expert.

    These are what expert parallel shards (each ep rank holds rows
    ``experts.local_experts`` of each) and reduces over dp only; everything else,
    routers and shared experts included, is replicated as in a dense model.
    """
    return [
        (f"{name}.{param_name}" if name else param_name, param)
        for name, module in model.named_modules()
        if isinstance(module, Experts)
        for param_name, param in module.named_parameters(recurse=False)
    ]


@dataclass(frozen=True)
class MoEStats:
    """This rank's MoE figures for the forwards since ``reset_stats``, over all MoE layers."""

    aux_loss: float  # the load-balancing loss (unweighted), mean over layers and forwards; 1.0 is even
    z_loss: float  # the router z-loss (unweighted), mean over layers and forwards
    dropped_fraction: float  # slots dropped for lack of capacity / slots routed
    load_min: float  # fewest slots routed to one expert of one layer, summed over the forwards
    load_max: float  # most slots routed to one expert of one layer, summed over the forwards


def reset_stats(model: nn.Module) -> None:
    """Zero every MoE layer's statistics (the engine does so at the start of each step)."""
    for _, layer in moe_layers(model):
        layer.stats.reset()


def collect_stats(model: nn.Module) -> MoEStats | None:
    """The MoE statistics since ``reset_stats`` (one host sync), or None when no MoE layer ran forward."""
    stats = [layer.stats for _, layer in moe_layers(model) if layer.stats.num_forwards]
    if not stats:
        return None
    forwards = sum(s.num_forwards for s in stats)
    sums = torch.stack(
        [
            sum(s.aux_loss for s in stats) / forwards,  # type: ignore[misc]
            sum(s.z_loss for s in stats) / forwards,  # type: ignore[misc]
            sum(s.dropped_slots for s in stats).float() / sum(s.num_slots for s in stats),  # type: ignore[union-attr]
            min(s.routed_per_expert.min() for s in stats).float(),  # type: ignore[union-attr]
            max(s.routed_per_expert.max() for s in stats).float(),  # type: ignore[union-attr]
        ]
    ).tolist()
    return MoEStats(*sums)
