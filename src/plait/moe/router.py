"""The router: which experts each token goes to, with what weight, and the auxiliary losses.

Everything here is computed in fp32, whatever the model's dtype: the softmax over
experts and the z-loss's logsumexp lose too much in bf16 (ST-MoE, section 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """The router's choices for T tokens."""

    logits: torch.Tensor  # (T, E) fp32
    probs: torch.Tensor  # (T, E) fp32, softmax over all experts (the load-balancing loss reads it)
    expert_index: torch.Tensor  # (T, k) int64, best first
    weight: torch.Tensor  # (T, k) fp32, what each chosen expert's output is multiplied by


class Router(nn.Module):
    """A linear map d_model -> num_experts without bias, applied in fp32."""

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))

    def reset_parameters(self, *, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (T, E) in fp32 for tokens ``x`` (T, d_model)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


def route(logits: torch.Tensor, *, top_k: int, softmax_order: str, normalize_topk: bool = False) -> Routing:
    """Top-k experts and their weights from router logits (T, E).

    ``softmax_order="before"``: weights are the top-k of softmax(logits), rescaled to sum
    to 1 when ``normalize_topk``. ``"after"``: weights are softmax over the top-k logits.
    """
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    if softmax_order == "before":
        weight, expert_index = probs.topk(top_k, dim=-1)
        if normalize_topk:
            weight = weight / weight.sum(dim=-1, keepdim=True)
    elif softmax_order == "after":
        top_logits, expert_index = logits.topk(top_k, dim=-1)
        weight = top_logits.softmax(dim=-1)
    else:
        raise ValueError(f"softmax_order={softmax_order!r} is not supported; use 'before' or 'after'")
    return Routing(logits=logits, probs=probs, expert_index=expert_index, weight=weight)


def load_balancing_loss(probs: torch.Tensor, routed_counts: torch.Tensor, *, top_k: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss, averaged over routing groups.

    Per group: ``E * sum_i f_i * P_i``, where f_i = token slots routed to expert i (all k
    choices, before capacity drops them) / (tokens * k) and P_i = the mean router
    probability of expert i. It is 1 for a perfectly even router and grows to E as all
    tokens pile onto one expert. Only P carries a gradient.

    ``probs`` is (G, T_g, E); ``routed_counts`` (G, E).
    """
    _, tokens_per_group, num_experts = probs.shape
    fraction = routed_counts.float() / (tokens_per_group * top_k)  # (G, E)
    mean_prob = probs.mean(dim=1)  # (G, E)
    return num_experts * (fraction * mean_prob).sum(dim=-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
