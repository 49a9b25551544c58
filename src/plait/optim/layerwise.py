"""What layer-wise adaptive optimizers (LAMB, LARS) share: each parameter's norm as one process sees it.

A trust ratio compares a parameter's norm with its update's. Under ZeRO a rank holds a flat range of
the parameter, under tensor parallel a slice: the norm is the square root of the squares summed over
every rank holding a piece. `MeshNorms` sums them with one all-reduce per sharded mesh axis for all
parameters at once, reading the placement records (as gradient clipping does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from plait.distributed.placement import CARVED_FROM_DP, placement_of

# not pp: pipeline stages hold different parameters; not cp: folded into dp (plait.distributed.mesh)
REDUCED_AXES = ("dp", "tp")


class NormReducer(Protocol):
    def __call__(self, squares: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Whole-tensor sums of squares from this rank's ``squares`` of its pieces of ``params``."""
        ...


def local_norms(squares: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One process holds every parameter whole: nothing to add."""
    return squares


class MeshNorms:
    """Sums of squares over the ranks of the mesh that hold pieces of each parameter.

    A parameter replicated over an axis counts once: its squares are divided by its replicas
    there before the sum. Ranks may hold different subsets of the parameters (a ZeRO shard can
    miss a small one), so the sums run over a vector indexed by parameter name, the union of
    every rank's names, agreed once at the first step.
    """

    def __init__(self, mesh: object) -> None:
        self.mesh = mesh
        self.axes = [axis for axis in REDUCED_AXES if mesh.group(axis) is not None]  # type: ignore[attr-defined]
        self._slots: dict[str, int] | None = None

    def __call__(self, squares: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.axes:
            return squares
        keys = [_key(param, index) for index, param in enumerate(params)]
        slots = self._agreed_slots(keys)
        replicas = torch.tensor([self._replicas(param) for param in params], dtype=squares.dtype)
        local = (squares.view(-1, len(params)) / replicas.to(squares.device)).contiguous()
        index = torch.tensor([slots[key] for key in keys], device=squares.device)
        whole = local.new_zeros(local.shape[0], len(slots)).index_copy_(1, index, local)
        for axis in self.axes:
            dist.all_reduce(whole, group=self.mesh.group(axis))  # type: ignore[attr-defined]
        return whole.index_select(1, index).reshape(-1)

    def _agreed_slots(self, keys: list[str]) -> dict[str, int]:
        if self._slots is None:
            union = set(keys)
            for axis in self.axes:
                gathered: list[list[str] | None] = [None] * self.mesh.size(axis)  # type: ignore[attr-defined]
                dist.all_gather_object(gathered, sorted(union), group=self.mesh.group(axis))  # type: ignore[attr-defined]
                union = {key for names in gathered for key in names or []}
            self._slots = {key: slot for slot, key in enumerate(sorted(union))}
        return self._slots

    def _replicas(self, param: torch.Tensor) -> int:
        """Ranks along the reduced axes holding the same piece; expert parallel carves ep x edp out of
        dp, so a piece split over ep (experts) or edp (their ZeRO shards) has fewer replicas along dp."""
        placement = placement_of(param)
        sharded = set(placement.sharded_axes) if placement else set()
        size = self.mesh.size  # type: ignore[attr-defined]
        replicas = math.prod(size(axis) for axis in self.axes if axis not in sharded and axis != "dp")
        if "dp" in self.axes and "dp" not in sharded:
            replicas *= size("dp") // math.prod(size(axis) for axis in CARVED_FROM_DP if axis in sharded)
        return replicas


class LayerwiseOptimizer(torch.optim.Optimizer):
    """An optimizer that needs whole-parameter norms: the engine hands it ``MeshNorms`` for its mesh.

    ``step`` runs the closure (if any) with gradients on, then ``_update``, which subclasses define.
    """

    norms: NormReducer = staticmethod(local_norms)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss

    def _update(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define _update (one step of every group)")


def use_mesh_norms(optimizer: torch.optim.Optimizer, *, mesh: object, offloaded: bool) -> None:
    """Give a layer-wise optimizer the norms of the mesh it runs on (nothing for other optimizers)."""
    if not isinstance(optimizer, LayerwiseOptimizer):
        return
    if offloaded:
        raise ValueError(
            f"{type(optimizer).__name__} needs every parameter's norm at each step, which the unit-by-unit host "
            "update of offloaded states does not give; use plait.optim.adamw with offload, or set the "
            "plan.offload_* fields to 'none'"
        )
    optimizer.norms = MeshNorms(mesh)


def _key(param: torch.Tensor, index: int) -> str:
    """A parameter's name from its placement record; its position when it has none (then every rank
    holds every parameter whole or by tp slices, in the same order)."""
    placement = placement_of(param)
    return placement.name if placement is not None else f"#{index}"


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(len(tensors),) float32 sums of squares, one fused kernel."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(list(tensors), 2)).float().pow(2)


def safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor, *, keep: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` where ``keep`` holds, else 1 (no adaptation for a zero norm)."""
    return torch.where(keep, numerator / denominator.clamp(min=torch.finfo(denominator.dtype).tiny), 1.0)


def adapts(group: dict[str, Any]) -> bool:
    """Whether a group's parameters take the layer-wise step: decayed ones, or any with ``always_adapt``."""
    return bool(group["weight_decay"] or group["always_adapt"])
