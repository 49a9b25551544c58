"""Plan's cross-field checks: sharding and offload fields, and the combinations plait does not build yet."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait.config.choices import OFFLOAD_TIERS, OFFLOADED_STATES, ZERO_SHARD_MODES, require

if TYPE_CHECKING:
    from plait.config.plan import Plan


def check_zero_shard(plan: Plan) -> None:
    shard = plan.zero_shard
    require(
        shard in ZERO_SHARD_MODES or (isinstance(shard, int) and not isinstance(shard, bool) and shard >= 1),
        f"plan.zero_shard={shard!r}: choose 'all' (every dp rank), 'node' (the dp ranks of one node) or a "
        "positive number of dp ranks that divides plan.dp",
    )
    require(
        shard == "all" or plan.zero > 0,
        f"plan.zero_shard={shard!r} shards ZeRO's states, but plan.zero=0 keeps them whole on every rank: "
        "set plan.zero to 1, 2 or 3, or drop plan.zero_shard",
    )
    require(
        not isinstance(shard, int) or plan.dp == -1 or plan.dp % shard == 0,
        f"plan.zero_shard={shard} does not divide plan.dp={plan.dp}: shards span groups of dp ranks; choose "
        f"a divisor of {plan.dp} (e.g. the dp ranks of one node)",
    )


def check_offload_fields(plan: Plan) -> None:
    for state in OFFLOADED_STATES:
        tier = getattr(plan, f"offload_{state}")
        require(
            tier in OFFLOAD_TIERS,
            f"plan.offload_{state}={tier!r}: choose one of {', '.join(OFFLOAD_TIERS)}",
        )
    if plan.memory_budget:
        budget = plan.memory_budget_bytes
        require(budget > 0, f"plan.memory_budget={plan.memory_budget!r}: give a positive size such as '16GiB'")
    auto = [s for s in OFFLOADED_STATES if getattr(plan, f"offload_{s}") == "auto"]
    require(
        not auto or bool(plan.memory_budget),
        f"plan.offload_{auto[0] if auto else ''}='auto' places states by a byte budget: set plan.memory_budget, "
        "e.g. '16GiB'",
    )
    disk = [s for s, tier in plan.offload_tiers.items() if tier in ("disk", "auto")]
    require(
        not disk or bool(plan.offload_dir),
        f"plan.offload_{disk[0] if disk else ''} may go to disk: set plan.offload_dir to a directory on a fast "
        "local disk (e.g. /mnt/nvme/plait-offload)",
    )


def check_context_parallel_available(plan: Plan) -> None:
    for other, used in (
        ("plan.ep", plan.ep > 1),
        ("plan.zero_shard", plan.zero_shard != "all"),
        ("offloaded states", plan.offloads),
    ):
        require(
            not used,
            f"plan.cp={plan.cp} with {other} is not available yet in plait; drop {other} or set plan.cp=1",
        )


def check_expert_parallel_available(plan: Plan) -> None:
    require(
        plan.dp == -1 or plan.dp % plan.ep == 0,
        f"plan.ep={plan.ep} does not divide plan.dp={plan.dp}: experts split over ep ranks carved from dp; "
        f"choose an ep that divides {plan.dp}",
    )
    require(
        not plan.offloads,
        f"plan.ep={plan.ep} with offloaded states is not available yet in plait; set the plan.offload_* "
        "fields to 'none' (and no plan.memory_budget)",
    )


def check_offload_available(plan: Plan) -> None:
    tiers = plan.offload_tiers
    require(
        plan.zero >= 1,
        "offload moves ZeRO's flat shards: set plan.zero=1 (optimizer, gradients) or plan.zero=3 (parameters too)",
    )
    require(
        tiers["params"] == "none" or plan.zero == 3,
        f"plan.offload_params={tiers['params']!r} needs plan.zero=3: under stage {plan.zero} every rank keeps "
        "whole parameters for compute; set plan.zero=3",
    )
    require(
        tiers["gradients"] == "none" or tiers["optimizer"] != "none",
        "plan.offload_gradients moves the gradient shard to where the optimizer steps, but the optimizer stays "
        "on the device; set plan.offload_optimizer too (or offload_gradients='none')",
    )


def check_pipeline_microbatches(plan: Plan) -> None:
    m, p = plan.microbatches, plan.pp
    require(
        plan.pp_schedule == "gpipe" or m >= p,
        f"plan.microbatches={m} is fewer than plan.pp={p} stages, which the {plan.pp_schedule} schedule needs; "
        f"raise plan.microbatches to at least {p}, or use plan.pp_schedule='gpipe'",
    )
    require(
        plan.pp_schedule != "interleaved" or (m % p == 0 and plan.pp_chunks >= 2),
        f"the interleaved schedule needs plan.microbatches a multiple of plan.pp={p} (got {m}) and "
        f"plan.pp_chunks >= 2 (got {plan.pp_chunks}); e.g. microbatches={max(p, m // p * p)}, pp_chunks=2",
    )
