"""Auxiliary losses delivered in backward, and the per-step statistics each MoE layer records.

The router's auxiliary losses never pass through the loss function or a pipeline
stage boundary: the layer's output goes through ``add_aux_grad``, whose forward is
the identity and whose backward also starts a backward from the auxiliary loss, with
gradient ``scale`` (Megatron-LM's MoEAuxLossAutoScaler). ``scale`` is what the
engine multiplies the main loss by on its way to backward, so that the update sees
the gradient of ``loss + aux_loss_weight * mean-over-routing-groups(aux)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class _AddAuxGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def add_aux_grad(output: torch.Tensor, aux_loss: torch.Tensor, *, scale: float) -> torch.Tensor:
    """``output`` unchanged; in backward, ``aux_loss`` also receives gradient ``scale``."""
    if not (torch.is_grad_enabled() and aux_loss.requires_grad and output.requires_grad):
        return output
    return _AddAuxGrad.apply(output, aux_loss, scale)


def in_backward() -> bool:
    """True while autograd runs a backward pass, e.g. while recomputation replays a forward."""
    # torch has no public query for this; the graph task id is -1 outside backward.
    return torch._C._current_graph_task_id() != -1


@dataclass
class LayerStats:
    """Detached sums over the forwards of one step (zeroed by ``reset``); nothing here syncs the host."""

    num_forwards: int = 0
    num_slots: int = 0  # slots routed (tokens x top_k)
    aux_loss: torch.Tensor | None = None  # sum over forwards of the load-balancing loss (unweighted)
    z_loss: torch.Tensor | None = None  # sum over forwards of the router z-loss (unweighted)
    dropped_slots: torch.Tensor | None = None  # slots dropped for lack of capacity
    routed_per_expert: torch.Tensor | None = None  # (E,) slots routed to each expert, before dropping

    def add(
        self,
        *,
        aux_loss: torch.Tensor,
        z_loss: torch.Tensor,
        dropped_slots: torch.Tensor,
        num_slots: int,
        routed_per_expert: torch.Tensor,
    ) -> None:
        """Add one forward's figures."""
        self.num_forwards += 1
        self.num_slots += num_slots
        self.aux_loss = _plus(self.aux_loss, aux_loss.detach().float())
        self.z_loss = _plus(self.z_loss, z_loss.detach().float())
        self.dropped_slots = _plus(self.dropped_slots, dropped_slots.detach())
        self.routed_per_expert = _plus(self.routed_per_expert, routed_per_expert.detach())

    def reset(self) -> None:
        self.num_forwards = self.num_slots = 0
        self.aux_loss = self.z_loss = self.dropped_slots = self.routed_per_expert = None


def _plus(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value.clone() if total is None else total + value
