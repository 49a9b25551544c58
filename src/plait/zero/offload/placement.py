"""Where each unit's states live: from the plan's tiers, or from a memory budget (hottest first).

Tiers per unit: `device` (where compute runs), `host` (host memory; pinned
on CUDA) and `disk` (files under `plan.offload_dir`). The optimizer's tier
holds the fp32 master shard, the optimizer state and the optimizer step; the
gradient shard goes at least as far as the host when the optimizer does.

With `plan.memory_budget`, states that fit stay in memory, hottest first
(the most disk moves per step saved per byte kept). Before the first step the
heat is what the schedule predicts (`predicted_heat`); after it, what the
pages measured (`Page.moves`), and states move where that differs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from plait.config import Plan
from plait.sizes import format_bytes

MOMENTS_PER_MASTER = 2  # Adam's exp_avg and exp_avg_sq, shaped like the master shard
STAGED_UNITS = 2  # per state kind on disk: the unit in use and the one being prefetched
GATHERED_UNITS = 3  # ZeRO-3: the unit computing, the next one gathering, one being reduced in backward
REDUCING_UNITS = 2  # gradient reductions in flight (zero/sharded.py MAX_IN_FLIGHT)
_TIER_OF = {"none": "device", "cpu": "host", "disk": "disk"}


@dataclass(frozen=True)
class UnitTiers:
    params: str = "device"
    optimizer: str = "device"
    grads: str = "device"

    @property
    def offloaded(self) -> bool:
        return (self.params, self.optimizer, self.grads) != ("device",) * 3


ON_DEVICE = UnitTiers()


@dataclass(frozen=True)
class UnitBytes:
    """One unit's sizes on one rank."""

    full: int  # elements of the gathered (padded) unit
    shard: int  # elements of this rank's shard

    def state_bytes(self, kind: str, *, param_bytes: int) -> int:
        per_element = {"params": param_bytes, "master": 4, "moments": 4 * MOMENTS_PER_MASTER, "grads": 4}[kind]
        return self.shard * per_element


def explicit_tiers(plan: Plan) -> UnitTiers:
    """The plan's tiers for every unit ('auto' states are decided by `place_by_budget`)."""
    tiers = plan.offload_tiers
    optimizer = _TIER_OF.get(tiers["optimizer"], "auto")
    grads = _TIER_OF.get(tiers["gradients"], "auto")
    if optimizer != "device" and grads == "device":
        grads = "host"  # the host optimizer reads its gradients there (ZeRO-Offload)
    return UnitTiers(params=_TIER_OF.get(tiers["params"], "auto"), optimizer=optimizer, grads=grads)


def working_set_bytes(units: list[UnitBytes], *, plan: Plan, param_bytes: int, tiers: UnitTiers) -> int:
    """Model-state bytes a rank holds whatever the placement: full parameters and gradients in use,
    reductions in flight, and staging for the states on disk."""
    largest = max(units, key=lambda u: u.full)
    if plan.zero == 3:
        full_params = GATHERED_UNITS * largest.full * param_bytes
    else:
        full_params = sum(u.full for u in units) * param_bytes
    full_grads = (sum(u.full for u in units) if plan.zero <= 1 else REDUCING_UNITS * largest.full) * param_bytes
    staging = 0
    biggest = max(units, key=lambda u: u.shard)
    for kind, tier in (("params", tiers.params), ("master", tiers.optimizer), ("grads", tiers.grads)):
        if tier in ("disk", "auto"):
            staging += STAGED_UNITS * biggest.state_bytes(kind, param_bytes=param_bytes)
    if tiers.optimizer in ("disk", "auto"):
        staging += STAGED_UNITS * biggest.state_bytes("moments", param_bytes=param_bytes)
    return full_params + full_grads + staging


def place_by_budget(
    units: list[UnitBytes], *, plan: Plan, param_bytes: int, budget: int, heat: dict[str, float] | None = None
) -> list[UnitTiers]:
    """Per unit, which states stay in memory under `budget` bytes; 'auto' states that do not fit go to disk.

    Raises ValueError (before any collective) when the budget is below the working set.
    """
    base = explicit_tiers(plan)
    minimum = working_set_bytes(units, plan=plan, param_bytes=param_bytes, tiers=base)
    if budget < minimum:
        raise ValueError(
            f"plan.memory_budget={plan.memory_budget} is below the {format_bytes(minimum)} this rank needs with "
            "every offloadable state on disk (units in use, reductions in flight, staging buffers); raise "
            f"plan.memory_budget to at least {format_bytes(minimum)}, or split the model further (more dp or tp)"
        )
    placed = [base] * len(units)
    left = budget - minimum
    for kind, index in _hottest_first(units, plan=plan, heat=heat):
        field = {"params": "params", "master": "optimizer", "grads": "grads"}[kind]
        if getattr(base, field) != "auto":
            continue
        size = units[index].state_bytes(kind, param_bytes=param_bytes)
        if kind == "master":
            size += units[index].state_bytes("moments", param_bytes=param_bytes)
        keep = size <= left
        left -= size if keep else 0
        placed[index] = replace(placed[index], **{field: _resident_tier(kind) if keep else "disk"})
    return [_settle(t) for t in placed]


@dataclass(frozen=True)
class BudgetPlacement:
    """What `place_by_budget` needs, kept to place again once the first step has measured the heat."""

    sizes: list[UnitBytes]
    plan: Plan
    param_bytes: int
    budget: int

    def place(self, heat: dict[str, float] | None = None) -> list[UnitTiers]:
        return place_by_budget(self.sizes, plan=self.plan, param_bytes=self.param_bytes, budget=self.budget, heat=heat)

    def predicted_heat(self) -> dict[str, float]:
        return predicted_heat(self.plan)


def predicted_heat(plan: Plan) -> dict[str, float]:
    """Reads and writes per step of one unit's state of each kind if it lived on disk, as the schedule
    predicts: a parameter shard is read for the forward and the backward gather of every micro-batch, a
    gradient shard written after every reduction and read before the next and by the update, the master
    and optimizer state read and written once. Each move is the whole state, so the count is also the
    I/O a byte kept in memory saves."""
    m = plan.microbatches
    return {"params": 2.0 * m, "grads": 2.0 * m, "master": 2.0}


def _resident_tier(kind: str) -> str:
    return "host" if kind in ("master", "grads") else "device"


def _settle(tiers: UnitTiers) -> UnitTiers:
    """Gradients follow an offloaded optimizer at least to the host."""
    if tiers.optimizer != "device" and tiers.grads == "device":
        return replace(tiers, grads="host")
    return tiers


def _hottest_first(units: list[UnitBytes], *, plan: Plan, heat: dict[str, float] | None) -> list[tuple[str, int]]:
    heat = heat or predicted_heat(plan)
    # ties go to gradients: they are written as well as read, and writes cost an SSD more
    kinds = [k for k in ("grads", "params", "master") if plan.zero == 3 or k != "params"]
    order = sorted(kinds, key=lambda k: -heat[k])
    return [(kind, index) for kind in order for index in range(len(units))]


def unit_sizes(numels: list[int], *, num_shards: int) -> list[UnitBytes]:
    out = []
    for numel in numels:
        shard = -(-numel // num_shards)
        out.append(UnitBytes(full=shard * num_shards, shard=shard))
    return out


def host_pinned() -> bool:
    return torch.cuda.is_available()
