"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from plait.optim.layerwise import LayerwiseOptimizer, NormReducer, adapts, local_norms, squared_norms


class Lars(LayerwiseOptimizer):
    """Momentum SGD whose step for each parameter is scaled by a local learning rate
    ``trust_coeff * ||w|| / (||g|| + weight_decay * ||w|| + eps)`` (1 where either norm is 0),
    applied to ``g + weight_decay * w`` (the decay inside the norm). With ``trust_clip`` (LARC)
    the local rate is divided by ``lr`` and capped at 1, so it never exceeds the global one.

    A group with ``weight_decay == 0`` and not ``always_adapt`` takes the plain momentum step:
    that is how biases and norm weights are excluded (``plait.optim.lars`` builds such groups).
    ``norms`` as in ``Lamb``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        always_adapt: bool = False,
        norms: NormReducer = local_norms,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coeff <= 0:
            raise ValueError(
                f"Lars: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, trust_coeff={trust_coeff}"
            )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Lars: nesterov needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        extra = dict(trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt)
        super().__init__(params, {**defaults, **extra})
        self.norms = norms

    def _update(self) -> None:
        work = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        adapted = [(group, params) for group, params in work if adapts(group) and params]
        ratios = iter(self._local_rates(adapted))
        for group, params in work:
            if not params:
                continue
            grads = [p.grad for p in params]
            if adapts(group):
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                torch._foreach_mul_(grads, [next(ratios) for _ in params])
            self._momentum_step(group, params, grads)

    def _local_rates(self, adapted: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> list[float]:
        params = [p for _, group_params in adapted for p in group_params]
        if not params:
            return []
        grads = [p.grad for p in params]
        squares = self.norms(torch.cat([squared_norms(params), squared_norms(grads)]), params)
        weight_norm, grad_norm = squares.sqrt().split(len(params))
        settings = [
            (g["trust_coeff"], g["weight_decay"], g["eps"], g["lr"], g["trust_clip"]) for g, ps in adapted for _ in ps
        ]
        coeff, decay, eps, lr, clip = (torch.tensor(column) for column in zip(*settings, strict=True))
        keep = (weight_norm > 0) & (grad_norm > 0)
        rates = torch.where(keep, coeff * weight_norm / (grad_norm + decay * weight_norm + eps), 1.0)
        return torch.where(clip, (rates / lr).clamp(max=1.0), rates).tolist()

    def _momentum_step(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """torch's fused SGD kernel: the momentum buffer's update and the parameter's in one pass per tensor
        (the first step's buffer is the gradient itself, as torch's SGD)."""
        momentum = group["momentum"]
        states = [self.state[param] for param in params]
        first_step = momentum != 0 and any("momentum_buffer" not in state for state in states)
        if first_step:
            for state, param in zip(states, params, strict=True):
                state.setdefault("momentum_buffer", torch.zeros_like(param))
        torch._fused_sgd_(
            params,
            grads,
            [state["momentum_buffer"] for state in states] if momentum != 0 else [],
            weight_decay=0.0,
            momentum=momentum,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=False,
            is_first_step=first_step,
        )
