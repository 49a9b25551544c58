"""Mixture of Experts: router, capacity, experts, the dispatch seam, auxiliary losses.

A layer (``MoELayer``) routes each token to ``top_k`` of ``num_experts`` MLPs. Routing
(``plait.moe.router``, ``plait.moe.capacity``) is kept apart from moving tokens to the
experts (``plait.moe.dispatch``), where expert parallel plugs in. The auxiliary losses
reach the router through backward alone (``plait.moe.aux``), so no loss function or
pipeline stage needs to know about them.
"""

from plait.moe.aux import LayerStats, add_aux_grad
from plait.moe.capacity import Assignment, assign_slots
from plait.moe.config import MoEConfig
from plait.moe.dispatch import Dispatch, Dispatched, LocalDispatch
from plait.moe.experts import Experts
from plait.moe.layer import MoELayer
from plait.moe.model import (
    MoEStats,
    collect_stats,
    expert_parameters,
    has_moe,
    moe_layers,
    reset_stats,
    set_aux_loss_scale,
    set_routing_groups,
)
from plait.moe.router import Router, Routing, load_balancing_loss, route, router_z_loss

__all__ = [
    "Assignment",
    "Dispatch",
    "Dispatched",
    "Experts",
    "LayerStats",
    "LocalDispatch",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "Router",
    "Routing",
    "add_aux_grad",
    "assign_slots",
    "collect_stats",
    "expert_parameters",
    "has_moe",
    "load_balancing_loss",
    "moe_layers",
    "reset_stats",
    "route",
    "router_z_loss",
    "set_aux_loss_scale",
    "set_routing_groups",
]
