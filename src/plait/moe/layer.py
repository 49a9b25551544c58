"""MoELayer: router, capacity, dispatch, experts and optional shared experts, in place of an MLP."""

from __future__ import annotations

import torch
from torch import nn

from plait.moe.aux import LayerStats, add_aux_grad, in_backward
from plait.moe.capacity import Assignment, assign_slots
from plait.moe.config import MoEConfig
from plait.moe.dispatch import Dispatch, LocalDispatch
from plait.moe.experts import Experts
from plait.moe.router import Router, Routing, load_balancing_loss, route, router_z_loss


class MoELayer(nn.Module):
    """A Mixture-of-Experts MLP: each token goes to its ``top_k`` experts, whose outputs are
    weighted by the router and summed; ``shared`` (any module, e.g. the model's dense MLP)
    is added for every token (Qwen2-MoE, DeepSeek-MoE).

    Routing groups: capacity, dropping and the auxiliary losses' statistics are defined per
    group of tokens. ``num_groups`` (default 1) splits the batch dim of the input into that
    many equal groups, so one process can compute what ``num_groups`` data-parallel ranks x
    micro-batches compute (see ``plait.moe.set_routing_groups``).

    Instance attributes the engine sets: ``num_groups``; ``aux_grad_scale``, the factor the
    main loss is scaled by before backward (``plait.moe.set_aux_loss_scale``); ``dispatch``,
    the token exchange (``LocalDispatch``: all experts here). ``stats`` holds detached
    per-step figures (``plait.moe.collect_stats``).

    Example:
        >>> layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2))
        >>> layer.reset_parameters()
        >>> layer(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, config: MoEConfig, *, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config.d_model, config.num_experts)
        self.experts = Experts(config)
        self.shared = shared
        self.dispatch: Dispatch = LocalDispatch()
        self.num_groups = 1
        self.aux_grad_scale = 1.0
        self.stats = LayerStats()

    def reset_parameters(self) -> None:
        """Router normal(0, init_std), then the experts, then the shared experts."""
        self.router.reset_parameters(std=self.config.init_std)
        self.experts.reset_parameters()
        if self.shared is not None:
            self.shared.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, seq, d_model) -> (batch, seq, d_model)."""
        flat = x.reshape(-1, x.shape[-1])  # (T, d_model), rows in batch-major order
        routing = route(
            self.router(flat),
            top_k=self.config.top_k,
            softmax_order=self.config.softmax_order,
            normalize_topk=self.config.normalize_topk,
        )
        assignment = self._assign(routing, batch=x.shape[0])
        out = self._experts_output(flat, assignment).view_as(x)
        if self.shared is not None:
            out = out + self.shared(x)
        return self._with_aux_losses(out, routing, assignment)

    def _assign(self, routing: Routing, *, batch: int) -> Assignment:
        groups = self.num_groups
        if batch % groups:
            raise ValueError(
                f"num_groups={groups} does not divide the batch of {batch} sequences; routing groups split "
                f"the batch dim evenly: set num_groups to a divisor of {batch} (dp x micro-batches)"
            )
        tokens_per_group = routing.expert_index.shape[0] // groups
        return assign_slots(
            routing.expert_index.view(groups, tokens_per_group, -1),
            routing.weight.view(groups, tokens_per_group, -1),
            num_experts=self.config.num_experts,
            capacity=self.config.capacity(tokens_per_group),
        )

    def _experts_output(self, flat: torch.Tensor, assignment: Assignment) -> torch.Tensor:
        """Gather each kept slot's token, run the experts, scale by the router weight, sum per token."""
        dispatched = self.dispatch.dispatch(flat[assignment.token_index], assignment.tokens_per_expert)
        expert_out = self.experts(dispatched.tokens, dispatched.tokens_per_local_expert)
        slot_out = self.dispatch.combine(expert_out, dispatched)  # (S_kept, d_model)
        weighted = slot_out * assignment.weight.to(slot_out.dtype)[:, None]
        # Dropped slots add nothing: their token carries on through the residual alone.
        return torch.zeros_like(flat).index_add_(0, assignment.token_index, weighted)

    def _with_aux_losses(self, out: torch.Tensor, routing: Routing, assignment: Assignment) -> torch.Tensor:
        groups = self.num_groups
        probs = routing.probs.view(groups, -1, self.config.num_experts)
        aux_loss = load_balancing_loss(probs, assignment.routed_counts, top_k=self.config.top_k)
        z_loss = router_z_loss(routing.logits)
        if not in_backward():  # recomputation replays this forward inside backward: count it once
            self.stats.add(
                aux_loss=aux_loss,
                z_loss=z_loss,
                dropped_slots=assignment.num_dropped,
                num_slots=assignment.num_slots,
                routed_per_expert=assignment.routed_counts.sum(dim=0),
            )
        weights = (self.config.aux_loss_weight, self.config.z_loss_weight)
        if not any(weights):
            return out
        total = weights[0] * aux_loss + weights[1] * z_loss
        return add_aux_grad(out, total, scale=self.aux_grad_scale)

    def extra_repr(self) -> str:
        c = self.config
        capacity = "dropless" if c.capacity_factor is None else f"capacity_factor={c.capacity_factor}"
        return f"experts={c.num_experts}, top_k={c.top_k}, {capacity}, num_groups={self.num_groups}"
