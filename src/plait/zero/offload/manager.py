"""Offload: one rank's offloaded states, their files, and what moving them cost.

Built before the units (its checks run before any collective), it attaches
pages to each unit as the unit is built, so a lazily initialised model never
holds more than a unit or two of state in memory during set-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from plait.distributed.placement import placement_of
from plait.zero.offload.disk import DiskStore
from plait.zero.offload.host_memory import huge_copy
from plait.zero.offload.pages import Page
from plait.zero.offload.placement import BudgetPlacement, UnitTiers
from plait.zero.offload.unit_like import UnitLike
from plait.zero.offload.unit_pages import UnitPages

Observer = Callable[[str], None]


class Offload:
    """The pages of every unit of one rank, the disk store behind them, and per-step statistics."""

    def __init__(self, tiers: list[UnitTiers], *, store: DiskStore | None, notes: list[str]) -> None:
        self.tiers = tiers
        self.store = store
        self.notes = notes  # for the log: placement, buffered I/O fallbacks
        self.units: list[UnitLike] = []
        self.observers: list[Observer] = []  # called at every unit boundary (tests count memory there)
        self.optimizer_s = 0.0
        self.publish_s = 0.0  # in memory: copying the stepped masters into the parameter shards
        self.backward_updates = 0  # units updated during backward in the last step (BackwardStep)
        self.optimizer: torch.optim.Optimizer | None = None  # set by the engine: its state is counted per tier
        self.placement: BudgetPlacement | None = None  # with a memory budget: re-placed from measured use
        self.steps_seen = 0

    @property
    def pages_optimizer(self) -> bool:
        """Whether some unit's gradients or optimizer state live on disk: the step then goes unit by unit."""
        return any(t.optimizer == "disk" or t.grads == "disk" for t in self.tiers)

    @property
    def has_partial_grads(self) -> bool:
        """Whether some piece's gradient must be summed over an axis before the update (sequence parallel)."""
        return any(
            (record := placement_of(piece)) is not None and record.partial_grad_axes
            for unit in self.units
            for piece in unit.pieces
        )

    def attach(self, index: int, unit: UnitLike) -> None:
        """Give a freshly built unit its pages and send their contents to disk."""
        self.units.append(unit)
        tiers = unit.tiers
        if "disk" not in (tiers.params, tiers.optimizer, tiers.grads):
            return
        assert self.store is not None
        pages = UnitPages()
        if tiers.optimizer == "disk":
            pages.master = self.written_page(f"unit{index}.master", [unit.master_shard])
        if tiers.params == "disk":
            aliased = unit.param_shard is unit.master_shard
            pages.params = pages.master if aliased else self.written_page(f"unit{index}.params", [unit.param_shard])
        if tiers.grads == "disk":
            pages.grads = self.fresh_grads_page(index, unit)
        unit.pages = pages

    def place_host_state(self, optimizer: torch.optim.Optimizer, units: list[UnitLike] | None = None) -> None:
        """Move the optimizer state of host-tier units onto huge pages: torch creates it at the first step
        (and a checkpoint load re-creates it) on 4 KiB pages, which slow the host step by about a fifth."""
        for unit in self.units if units is None else units:
            if unit.tiers.optimizer != "host":
                continue
            for piece in unit.pieces:
                state = optimizer.state.get(piece, {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and not hasattr(value, "_plait_huge"):
                        state[key] = huge_copy(value)
                        state[key]._plait_huge = True

    def written_page(self, key: str, tensors: list[torch.Tensor]) -> Page:
        """A page of `tensors`, written to disk and freed."""
        assert self.store is not None
        page = Page(key, tensors, store=self.store)
        page.evict(write=True)
        return page

    def fresh_grads_page(self, index: int, unit: UnitLike) -> Page:
        """The unit's gradient shard as a page of zeros: nothing written, its memory freed."""
        assert self.store is not None
        page = Page(f"unit{index}.grads", [unit.grad_shard], store=self.store, fresh=True)
        page.mark_fresh()
        return page

    def observe(self, where: str) -> None:
        for observer in self.observers:
            observer(where)

    def pages(self) -> list[Page]:
        return [page for unit in self.units if unit.pages is not None for page in unit.pages.all()]

    def prefetch_params(self, units: list[UnitLike]) -> None:
        for unit in units:
            if unit.pages is not None and unit.pages.params is not None:
                unit.pages.params.fetch()

    def prefetch_step(self, unit: UnitLike) -> None:
        """Start reading what a unit's update needs; its pages stay until the update writes them back."""
        if unit.pages is not None:
            unit.pages.stepping = True
            for page in unit.pages.for_step():
                page.fetch()

    def paged(self, units: list[UnitLike], pages_of: Callable[[UnitLike], list[Page]]) -> Iterator[UnitLike]:
        """Yield each unit with `pages_of(unit)` in memory, fetching the next unit's meanwhile."""
        for page in pages_of(units[0]) if units else []:
            page.fetch()
        for position, unit in enumerate(units):
            if position + 1 < len(units):
                for page in pages_of(units[position + 1]):
                    page.fetch()
            for page in pages_of(unit):
                page.wait()
            self.observe(f"step:{position}")
            yield unit

    def reset_stats(self) -> None:
        self.optimizer_s = 0.0
        self.publish_s = 0.0
        self.backward_updates = 0
        for page in self.pages():
            page.wait_s = 0.0
        if self.store is not None:
            self.store.stats.reset()

    def stats(self) -> dict[str, Any]:
        """What the last step moved and how much of it compute hid (see the metrics line)."""
        io = self.store.stats if self.store is not None else None
        busy = io.busy_s if io else 0.0
        wait = sum(page.wait_s for page in self.pages())
        return {
            "read_bytes": io.read_bytes if io else 0,
            "write_bytes": io.write_bytes if io else 0,
            "io_busy_s": busy,
            "io_wait_s": wait,
            "hidden_share": max(0.0, 1.0 - wait / busy) if busy > 0 else 1.0,
            "optimizer_s": self.optimizer_s,
            "publish_s": self.publish_s,
            "backward_updates": self.backward_updates,
            "resident_bytes": self.resident_bytes(),
        }

    def resident_bytes(self) -> dict[str, int]:
        """Model-state bytes per tier on this rank now: on the device, in host memory, and on disk."""
        out = {"device": 0, "host": 0, "disk": 0}
        seen: set[int] = set()
        for unit in self.units:
            tiers = unit.tiers
            states = [(unit.param_shard, tiers.params), (unit.master_shard, tiers.optimizer)]
            states += [(unit.grad_shard, tiers.grads)] + [(t, tiers.optimizer) for t in self.optimizer_state(unit)]
            for tensor, tier in states:
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                where = "disk" if tensor.untyped_storage().nbytes() == 0 else "device" if tier == "device" else "host"
                out[where] += tensor.numel() * tensor.element_size()
        return out

    def optimizer_state(self, unit: UnitLike) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        states = [self.optimizer.state.get(piece, {}) for piece in unit.pieces]
        return [v for state in states for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
