"""Loss scaling and non-finite gradient detection that every rank agrees on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from plait.amp.policy import PrecisionPolicy
from plait.distributed.comm import CommCounter


@dataclass(frozen=True)
class Overflow:
    """Whether any gradient had an inf/nan, and the first such parameter in model order."""

    found: bool
    first_name: str | None


class LossScaler:
    """Dynamic loss scaling for fp16; with ``dynamic=False`` only the non-finite check.

    fp16 gradients below ~6e-8 flush to zero, so the loss is multiplied by
    ``scale`` before backward and the gradients divided by it afterwards. The
    scale shrinks by ``backoff_factor`` on every step whose gradients overflow
    (that step is skipped) and grows by ``growth_factor`` after
    ``growth_interval`` good steps in a row. fp32 and bf16 have fp32's exponent
    range and need no scale, but a non-finite gradient must still skip the
    step: ``dynamic=False`` keeps the scale at 1 and everything else working.

    One step::

        scaler.scale_loss(loss).backward()
        overflow = scaler.check_overflow(named_grads, groups=[mesh.group("tp"), mesh.group("dp")])
        if not overflow.found:
            scaler.unscale_(fp32_master_grads)  # fp32: fp16 grads would underflow again
            optimizer.step()
        else:
            log(scaler.message(overflow, step))  # before update(): it reports the old -> new scale
        scaler.update(overflow)
    """

    def __init__(
        self,
        *,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
        dynamic: bool = True,
    ) -> None:
        _check_schedule(
            init_scale,
            min_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
        )
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.dynamic = dynamic
        self._scale = float(init_scale) if dynamic else 1.0
        self._num_good_steps = 0

    @classmethod
    def from_policy(cls, policy: PrecisionPolicy, **kwargs: Any) -> LossScaler:
        """A dynamic scaler for fp16, a check-only one otherwise; kwargs go to the constructor."""
        return cls(dynamic=policy.uses_loss_scaling, **kwargs)

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 when not dynamic)."""
        return self._scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``; compute the loss in fp32 so the scaled value itself stays finite."""
        return loss * self._scale if self.dynamic else loss

    def check_overflow(
        self,
        named_grads: Sequence[tuple[str, torch.Tensor | None]],
        *,
        groups: Sequence[dist.ProcessGroup | None],
        device: torch.device | None = None,
        counter: CommCounter | None = None,
    ) -> Overflow:
        """Find the first parameter, in the given order, whose gradient has an inf or nan on any rank.

        ``named_grads`` must list the same names in the same order on every
        rank (each rank passes its own shard, or None where it holds none).
        The local first index is min-reduced over each group in ``groups``; a
        None entry is an axis of one rank and is skipped (it does not mean the
        world group: pass ``dist.group.WORLD`` for that). ``device`` places the
        reduced index when no gradient is present locally (NCCL needs a CUDA
        tensor). One host sync. The reductions are recorded on ``counter`` when given.
        """
        first = local_first_non_finite(named_grads, device=device)
        return self.agree_on_first(first, [name for name, _ in named_grads], groups=groups, counter=counter)

    def agree_on_first(
        self,
        first: torch.Tensor,
        names: Sequence[str],
        *,
        groups: Sequence[dist.ProcessGroup | None],
        counter: CommCounter | None = None,
    ) -> Overflow:
        """Min-reduce a local first non-finite index (len(names) when none) over `groups`."""
        for group in groups:
            if group is not None:
                if counter is not None:
                    counter.record("all_reduce", first, group=group)
                dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
        index = int(first.item())
        if index >= len(names):
            return Overflow(found=False, first_name=None)
        return Overflow(found=True, first_name=names[index])

    def unscale_(self, grads: Sequence[torch.Tensor]) -> None:
        """Divide gradients by the scale in place (exact for power-of-2 scales); no-op when not dynamic."""
        if self.dynamic and len(grads) > 0:
            torch._foreach_mul_(list(grads), 1.0 / self._scale)

    def update(self, overflow: Overflow) -> None:
        """Back off after an overflow; grow after ``growth_interval`` good steps in a row."""
        if not self.dynamic:
            return
        if overflow.found:
            self._scale = self._backed_off_scale()
            self._num_good_steps = 0
            return
        self._num_good_steps += 1
        if self._num_good_steps >= self.growth_interval:
            self._scale *= self.growth_factor
            self._num_good_steps = 0

    def message(self, overflow: Overflow, step: int) -> str:
        """A log line for the step; call it before update() so it shows the scale change."""
        if not overflow.found:
            return f"step {step}: gradients finite; loss scale {_format_scale(self._scale)}"
        text = f"step {step} skipped: non-finite gradient first found in {overflow.first_name}"
        if self.dynamic:
            text += f"; loss scale {_format_scale(self._scale)} -> {_format_scale(self._backed_off_scale())}"
        return text

    def state_dict(self) -> dict[str, Any]:
        """The scale and the good-step counter (the schedule's settings come from the constructor)."""
        return {"scale": self._scale, "num_good_steps": self._num_good_steps, "dynamic": self.dynamic}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""
        if bool(state["dynamic"]) != self.dynamic:
            raise ValueError(
                f"loss scaler state has dynamic={state['dynamic']} but this scaler has dynamic={self.dynamic}: "
                "resume with the precision the checkpoint was trained in"
            )
        self._scale = float(state["scale"])
        self._num_good_steps = int(state["num_good_steps"])

    def _backed_off_scale(self) -> float:
        return max(self._scale * self.backoff_factor, self.min_scale)


def local_first_non_finite(
    named_grads: Sequence[tuple[str, torch.Tensor | None]], *, device: torch.device | None
) -> torch.Tensor:
    """0-dim int64: the index of the first non-finite local gradient, len(named_grads) if none."""
    # Empty shards (a ZeRO rank's slice can be empty) have no inf-norm.
    indices = [i for i, (_, grad) in enumerate(named_grads) if grad is not None and grad.numel() > 0]
    grads = [named_grads[i][1].detach() for i in indices]
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    none_found = torch.tensor(len(named_grads), dtype=torch.int64, device=device)
    if not grads:
        return none_found
    # The max-abs norm is one fused foreach pass; it is inf/nan exactly when an element is, and cannot
    # overflow on finite values the way a sum of squares can.
    max_abs = torch.stack([norm.to(device) for norm in torch._foreach_norm(grads, math.inf)])
    positions = torch.tensor(indices, dtype=torch.int64, device=device)
    return torch.where(torch.isfinite(max_abs), none_found, positions).min()


def _check_schedule(
    init_scale: float, min_scale: float, *, growth_factor: float, backoff_factor: float, growth_interval: int
) -> None:
    if not min_scale > 0:
        raise ValueError(f"LossScaler min_scale={min_scale}: use a positive floor such as 1.0")
    if not init_scale >= min_scale:
        raise ValueError(f"LossScaler init_scale={init_scale}: use a value >= min_scale={min_scale}, e.g. 2**16")
    if not growth_factor > 1:
        raise ValueError(f"LossScaler growth_factor={growth_factor}: use a factor above 1, e.g. 2.0")
    if not 0 < backoff_factor < 1:
        raise ValueError(f"LossScaler backoff_factor={backoff_factor}: use a factor in (0, 1), e.g. 0.5")
    if growth_interval < 1:
        raise ValueError(f"LossScaler growth_interval={growth_interval}: use 1 or more good steps, e.g. 1000")


def _format_scale(scale: float) -> str:
    return str(int(scale)) if scale.is_integer() else repr(scale)
