"""Place again after the first step, from the moves the pages measured (Gemini-style warm-up).

The schedule's prediction can be wrong: a parameter shard that is also the
master shard (fp32, both on disk) is read by every gather as well as by the
update, so keeping that master in memory saves more than its own two moves;
when each unit is updated inside backward, a gradient shard never reaches
the disk at all. States whose tier changes are moved: brought into memory
(the page is read and dropped), or written out (a page is made and evicted).
The measured heat covers the kinds that have pages; the others keep the
prediction.
"""

from __future__ import annotations

from plait.zero.offload.manager import Offload
from plait.zero.offload.pages import Page
from plait.zero.offload.placement import UnitTiers
from plait.zero.offload.unit_like import UnitLike
from plait.zero.offload.unit_pages import UnitPages

_KIND_OF_PAGE = {"params": "params", "master": "master", "moments": "master", "grads": "grads"}


def measured_heat(offload: Offload) -> dict[str, float]:
    """Bytes moved per byte held, per kind, over the measured steps, for the kinds that have pages (a
    parameter shard that is the master shard counts with the master: its gathers' reads are the master's)."""
    moved: dict[str, int] = {}
    held: dict[str, int] = {}
    for unit in offload.units:
        pages = unit.pages
        if pages is None:
            continue
        for field in ("params", "master", "moments", "grads"):
            page = getattr(pages, field)
            if page is not None and not (field == "params" and page is pages.master):
                kind = _KIND_OF_PAGE[field]
                moved[kind] = moved.get(kind, 0) + page.moves * page.nbytes
                held[kind] = held.get(kind, 0) + page.nbytes
    return {kind: moved[kind] / held[kind] for kind in moved if held[kind]}


WARM_UP_STEPS = 1  # the first step creates the optimizer state; the second is measured


def after_step(offload: Offload) -> str | None:
    """Call after every optimizer step: measures the step after the warm-up, then re-places once."""
    offload.steps_seen += 1
    if offload.steps_seen == WARM_UP_STEPS:
        for page in offload.pages():
            page.moves = 0
    if offload.steps_seen == WARM_UP_STEPS + 1:
        return settle(offload, steps=1)
    return None


def settle(offload: Offload, *, steps: int) -> str | None:
    """After `steps` measured steps: re-place by the measured heat, move what changed; a log line or None."""
    if offload.placement is None:
        return None
    heat = offload.placement.predicted_heat() | {k: v / steps for k, v in measured_heat(offload).items()}
    new_tiers = offload.placement.place(heat)
    moved = [
        index
        for index, (unit, tiers) in enumerate(zip(offload.units, new_tiers, strict=True))
        if _move(offload, index, unit, tiers)
    ]
    if not moved:
        return None
    offload.tiers = [unit.tiers for unit in offload.units]
    shown = ", ".join(f"{kind} {value:.1f}" for kind, value in sorted(heat.items()))
    return f"offload: measured moves per step ({shown}) re-placed {len(moved)} units"


def _move(offload: Offload, index: int, unit: UnitLike, new: UnitTiers) -> bool:
    """Bring the unit's states to `new`'s tiers where they differ (disk or memory); True if anything moved."""
    old = unit.tiers
    pages = unit.pages or UnitPages()
    moves = []
    if (old.grads == "disk") != (new.grads == "disk"):
        pages.grads = None if new.grads != "disk" else offload.fresh_grads_page(index, unit)
        moves.append("grads")
    if (old.params == "disk") != (new.params == "disk"):
        _move_params(offload, index, unit, pages, to_disk=new.params == "disk")
        moves.append("params")
    if (old.optimizer == "disk") != (new.optimizer == "disk"):
        _move_optimizer(offload, index, unit, pages, to_disk=new.optimizer == "disk")
        moves.append("optimizer")
    if moves:
        optimizer = _memory_label(new.optimizer)
        params = optimizer if unit.param_shard is unit.master_shard else _memory_label(new.params)
        unit.tiers = UnitTiers(params=params, optimizer=optimizer, grads=_memory_label(new.grads))
        unit.pages = pages if pages.all() else None
    return bool(moves)


def _memory_label(tier: str) -> str:
    """A state brought in from disk is in a host tensor, whatever tier in memory the placement names."""
    return "disk" if tier == "disk" else "host"


def _move_params(offload: Offload, index: int, unit: UnitLike, pages: UnitPages, *, to_disk: bool) -> None:
    if not to_disk:
        if pages.params is not None and pages.params is pages.master:  # one tensor on disk: keep a copy in
            pages.master.wait()
            unit.param_shard = unit.master_shard.clone()
            pages.master.evict(write=False)
        else:
            _to_memory(pages.params)
        pages.params = None
    else:
        if unit.param_shard is unit.master_shard and unit.full.dtype != unit.master_shard.dtype:
            unit.param_shard = unit.master_shard.to(unit.full.dtype)  # ZeRO-3 in 16 bits: its own shard on disk
        if unit.param_shard is not unit.master_shard:
            pages.params = offload.written_page(f"unit{index}.params", [unit.param_shard])


def _move_optimizer(offload: Offload, index: int, unit: UnitLike, pages: UnitPages, *, to_disk: bool) -> None:
    if not to_disk:
        _to_memory(pages.master)
        _to_memory(pages.moments)
        pages.params = None if pages.params is pages.master else pages.params
        pages.master = pages.moments = None
        return
    pages.master = offload.written_page(f"unit{index}.master", [unit.master_shard])
    state = offload.optimizer_state(unit)
    pages.moments = offload.written_page(f"unit{index}.moments", state) if state else None


def _to_memory(page: Page | None) -> None:
    """Read a page back for good (the caller drops it)."""
    if page is not None:
        page.wait()
