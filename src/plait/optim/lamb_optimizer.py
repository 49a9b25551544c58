"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from plait.optim.layerwise import LayerwiseOptimizer, NormReducer, adapts, local_norms, safe_ratio, squared_norms


class Lamb(LayerwiseOptimizer):
    """Adam's bias-corrected moments, decoupled weight decay inside the update, and a per-parameter
    trust ratio ||w|| / ||update|| (1 where either norm is 0; at most 1 with ``trust_clip``).

    A group with ``weight_decay == 0`` and not ``always_adapt`` takes the plain Adam step: that is
    how biases and norm weights are excluded (``plait.optim.lamb`` builds such groups).
    ``norms`` turns this rank's sums of squares into whole-parameter ones (``MeshNorms`` under
    ZeRO / tensor parallel; the engine sets it).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        norms: NormReducer = local_norms,
    ) -> None:
        if lr < 0 or eps <= 0 or not all(0 <= beta < 1 for beta in betas) or weight_decay < 0:
            raise ValueError(f"Lamb: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay} out of range")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_clip=trust_clip)
        super().__init__(params, {**defaults, "always_adapt": always_adapt})
        self.norms = norms

    def _update(self) -> None:
        work = [(group, *self._updates(group)) for group in self.param_groups]
        adapted = [(group, params, updates) for group, params, updates in work if adapts(group)]
        ratios = iter(self._trust_ratios(adapted))
        for group, params, updates in work:
            if adapts(group):
                torch._foreach_mul_(updates, [next(ratios) for _ in updates])
            torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _updates(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Adam's direction plus decoupled decay, for each parameter with a gradient.

        torch's fused Adam kernel updates the moments and adds the bias-corrected direction to the decay
        term in one pass per tensor (lr = -1 turns its `param -= lr * direction` into `+= direction`),
        instead of ten foreach passes over the moments and their temporaries.
        """
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return [], []
        beta1, beta2 = group["betas"]
        states = [self._state(p) for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        decay = group["weight_decay"]
        updates = torch._foreach_mul(params, decay) if decay else [torch.zeros_like(p) for p in params]
        torch._fused_adam_(
            updates,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            steps,
            lr=-1.0,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )
        return params, updates

    def _state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)  # the fused kernel reads it
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        elif state["step"].device != param.device:  # a loaded checkpoint keeps `step` where it was saved
            state["step"] = state["step"].to(param.device)
        return state

    def _trust_ratios(
        self, adapted: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]
    ) -> list[float]:
        """||w|| / ||update|| for every adapted parameter, in order (one reduction for all of them)."""
        params = [p for _, group_params, _ in adapted for p in group_params]
        if not params:
            return []
        updates = [u for _, _, group_updates in adapted for u in group_updates]
        squares = self.norms(torch.cat([squared_norms(params), squared_norms(updates)]), params)
        weight_norm, update_norm = squares.sqrt().split(len(params))
        ratios = safe_ratio(weight_norm, update_norm, keep=(weight_norm > 0) & (update_norm > 0))
        clip = torch.tensor([bool(group["trust_clip"]) for group, group_params, _ in adapted for _ in group_params])
        return torch.where(clip, ratios.clamp(max=1.0), ratios).tolist()
