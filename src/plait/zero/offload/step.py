"""The optimizer phase when gradients or optimizer state live on disk: unit by unit, in two passes.

Pass one reads each unit's gradients once (the next unit's read runs
meanwhile): it applies the step's gradient scale, sums partial gradients over
their axes, and collects the norm terms and the first non-finite gradient,
so the global norm and the fp16 overflow verdict are exact before any
weight moves. Pass two brings in each unit's gradients, master shard and
optimizer state, clips, steps the user's optimizer on that unit's pieces
only (its parameter groups narrowed to them; hyperparameters and schedules
untouched), publishes the new weights and writes the unit back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from plait.amp.scaler import LossScaler, Overflow, local_first_non_finite
from plait.distributed.comm import CommCounter
from plait.distributed.mesh import Mesh
from plait.distributed.partial_grads import reduce_partial_grads
from plait.distributed.placement import placement_of
from plait.optim.clip import clip_coefficient, finish_norm, merge_terms, norm_terms
from plait.zero.offload.manager import Offload
from plait.zero.offload.pages import Page
from plait.zero.offload.unit_like import UnitLike

_NONE = 2**62  # no non-finite gradient in a unit (the index space is all units' names)


@dataclass(frozen=True)
class StepContext:
    mesh: Mesh
    scaler: LossScaler
    counter: CommCounter
    device: torch.device
    max_grad_norm: float | None


def _grad_pages(unit: UnitLike) -> list[Page]:
    return [unit.pages.grads] if unit.pages is not None and unit.pages.grads is not None else []


def _step_pages(unit: UnitLike) -> list[Page]:
    return unit.pages.for_step() if unit.pages is not None else []


def gradient_pass(
    offload: Offload, *, factor: torch.Tensor | float | None, context: StepContext
) -> tuple[torch.Tensor, Overflow | None]:
    """Pass one: scale, reduce partial gradients, and find the global norm and any overflow."""
    terms: dict[int, list[torch.Tensor]] = {}
    names: list[str] = []
    first = torch.full((), _NONE, dtype=torch.int64, device=context.device)
    for unit in offload.paged(offload.units, _grad_pages):
        grads = [piece.grad for piece in unit.pieces]
        changed = factor is not None and bool(grads)
        if changed:
            torch._foreach_mul_(grads, factor)
        changed |= reduce_partial_grads(unit.pieces, mesh=context.mesh, counter=context.counter)
        if context.scaler.dynamic:
            named = _named_grads(unit)
            local = local_first_non_finite(named, device=context.device)
            first = torch.minimum(first, torch.where(local < len(named), local + len(names), _NONE))
        names += unit.names
        merge_terms(terms, norm_terms(unit.pieces, mesh=context.mesh))
        for page in _grad_pages(unit):
            page.evict(write=changed)
    norm = finish_norm(terms, mesh=context.mesh, counter=context.counter)
    overflow = None
    if context.scaler.dynamic:
        first = first.clamp(max=len(names))
        groups = [context.mesh.group("dp"), context.mesh.group("tp")]
        overflow = context.scaler.agree_on_first(first, names, groups=groups, counter=context.counter)
    return norm, overflow


def _named_grads(unit: UnitLike) -> list[tuple[str, torch.Tensor | None]]:
    local = {placement_of(piece).name: piece.grad for piece in unit.pieces}
    return [(name, local.get(name)) for name in unit.names]


def update_pass(
    offload: Offload, optimizer: torch.optim.Optimizer, *, norm: torch.Tensor, context: StepContext
) -> None:
    """Pass two: clip, step each unit's pieces, publish, write back."""
    start = time.perf_counter()
    coefficient = clip_coefficient(norm, context.max_grad_norm) if context.max_grad_norm else None
    handles: list[dist.Work] = []
    for unit in offload.paged(offload.units, _step_pages):
        if unit.pages is not None:
            unit.pages.stepping = True
        grads = [piece.grad for piece in unit.pieces if piece.grad is not None]
        if coefficient is not None and grads:
            torch._foreach_mul_(grads, coefficient.to(grads[0].device))
        with narrowed(optimizer, unit.pieces):
            optimizer.step()
        page_new_state(offload, unit, optimizer)
        handle = unit.publish_step()
        if handle is not None:
            handles.append(handle)
        _write_back(unit)
    for handle in handles:
        handle.wait()
    offload.optimizer_s += time.perf_counter() - start


class FinalGradsHandler(Protocol):
    """Called by ZeRO for each unit on the step's last backward: before its reduction starts and after
    its reduced gradients are final."""

    def before_reduce(self, unit: UnitLike) -> None: ...

    def after_reduce(self, unit: UnitLike) -> None: ...


class UnitNorms:
    """Each unit's norm terms as backward finishes it, summed in the units' own order at the end (the
    order the in-memory step adds them in, so the norm is the same to the last bit)."""

    def __init__(self, units: list[UnitLike], *, mesh: Mesh) -> None:
        self.units = units
        self.mesh = mesh
        self.by_unit: dict[int, dict[int, list[torch.Tensor]]] = {}

    def add(self, unit: UnitLike) -> None:
        self.by_unit[id(unit)] = norm_terms(unit.pieces, mesh=self.mesh)

    def finish(self, *, counter: CommCounter) -> torch.Tensor:
        terms: dict[int, list[torch.Tensor]] = {}
        for unit in self.units:
            merge_terms(terms, self.by_unit.get(id(unit), {}))
        return finish_norm(terms, mesh=self.mesh, counter=counter)


class NormCollector:
    """The gradient norm's terms taken from each unit's final gradients while they are in memory, so the
    step need not read every gradient back once more before clipping."""

    def __init__(self, units: list[UnitLike], *, mesh: Mesh) -> None:
        self.norms = UnitNorms(units, mesh=mesh)

    def before_reduce(self, unit: UnitLike) -> None:
        if unit.pages is not None:
            unit.pages.stepping = True  # keep the gradients in memory after the reduction adds into them

    def after_reduce(self, unit: UnitLike) -> None:
        self.norms.add(unit)
        if unit.pages is not None:
            unit.pages.stepping = False
            if unit.pages.grads is not None:
                unit.pages.grads.evict(write=True)

    def finish(self, *, counter: CommCounter) -> torch.Tensor:
        return self.norms.finish(counter=counter)


class BackwardStep:
    """Each unit's update as soon as backward has reduced its final gradients, overlapping the rest of
    backward. Exact only when nothing needs every gradient first: no clipping, no fp16 overflow check,
    a divisor known before backward, no partial gradients; the engine arms it only then."""

    def __init__(self, offload: Offload, optimizer: torch.optim.Optimizer, *, mesh: Mesh) -> None:
        self.offload = offload
        self.optimizer = optimizer
        self.norms = UnitNorms(offload.units, mesh=mesh)
        self.handles: list[dist.Work] = []

    def before_reduce(self, unit: UnitLike) -> None:
        self.offload.prefetch_step(unit)  # its update follows this reduction: read its state meanwhile

    def after_reduce(self, unit: UnitLike) -> None:
        start = time.perf_counter()
        for page in _step_pages(unit):
            page.wait()
        self.norms.add(unit)  # the norm is reported, not applied
        with narrowed(self.optimizer, unit.pieces):
            self.optimizer.step()
        page_new_state(self.offload, unit, self.optimizer)
        handle = unit.publish_step()
        if handle is not None:
            self.handles.append(handle)
        _write_back(unit)
        self.offload.optimizer_s += time.perf_counter() - start
        self.offload.backward_updates += 1
        self.offload.observe("backward-step")

    def finish(self, *, counter: CommCounter) -> torch.Tensor:
        """Wait for the re-gathers; the global norm of the gradients the updates used."""
        for handle in self.handles:
            handle.wait()
        return self.norms.finish(counter=counter)


def _write_back(unit: UnitLike) -> None:
    pages = unit.pages
    if pages is None:
        return
    pages.stepping = False
    for page in (pages.master, pages.moments):
        if page is not None:
            page.evict(write=True)
    if pages.grads is not None:
        pages.grads.mark_fresh()


def page_new_state(offload: Offload, unit: UnitLike, optimizer: torch.optim.Optimizer) -> None:
    """The first step creates the optimizer state: from now on it lives on disk with the master (or, on the
    host tier, on huge pages)."""
    pages = unit.pages
    if pages is None or pages.master is None:
        offload.place_host_state(optimizer, [unit])
        return
    if pages.moments is not None:
        return
    tensors = [
        value
        for piece in unit.pieces
        for value in optimizer.state.get(piece, {}).values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    ]
    if tensors:
        store = pages.master.store
        pages.moments = Page(pages.master.key.replace("master", "moments"), tensors, store=store)


@contextmanager
def narrowed(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> Iterator[None]:
    """Let `optimizer.step()` see only `params` (their groups keep every hyperparameter)."""
    wanted = {id(p) for p in params}
    groups = optimizer.param_groups
    saved = [group["params"] for group in groups]
    try:
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) in wanted]
        optimizer.param_groups = [group for group in groups if group["params"]]
        yield
    finally:
        optimizer.param_groups = groups
        for group, params_of_group in zip(groups, saved, strict=True):
            group["params"] = params_of_group
