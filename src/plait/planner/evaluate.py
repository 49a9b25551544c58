"""`plait plan --evaluate FIELDS`: one given plan's estimate, in full, instead of a search.

FIELDS are `plan` keys as in a config's [plan] table, comma-separated:
`--evaluate zero=3,offload_optimizer=disk,offload_params=disk,offload_gradients=disk,offload_dir=/x`.
dp defaults to what the devices leave after tp and pp; precision to `--precision`'s.
"""

from __future__ import annotations

import typing

from plait.config import Config, Plan, TrainConfig
from plait.planner.estimate import Estimate, describe, describe_tiers
from plait.planner.offload import Traffic
from plait.planner.workload import Workload

GIB = 2**30
EXAMPLE = "--evaluate zero=3,offload_optimizer=disk,offload_params=disk,offload_dir=/mnt/nvme/plait"
_LIST_FIELDS = ("recompute_modules", "pp_split")


def _value(key: str, text: str, kind: object) -> object:
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--evaluate {key}={text}: write true or false")
        return text.lower() == "true"
    if kind is int or kind is float:
        try:
            return int(text) if kind is int else float(text)
        except ValueError:
            raise ValueError(f"--evaluate {key}={text}: expected a number of type {kind.__name__}") from None
    return text


def parse_plan_fields(text: str) -> dict[str, object]:
    """'zero=3,offload_optimizer=disk' as Plan keyword arguments, each typed as the Plan field."""
    types = typing.get_type_hints(Plan)
    out: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("plan.")
        if not sep or key not in types or key in _LIST_FIELDS:
            raise ValueError(
                f"--evaluate {item!r}: write plan fields as key=value separated by commas, e.g. {EXAMPLE} "
                f"(keys: {', '.join(k for k in types if k not in _LIST_FIELDS)})"
            )
        out[key] = _value(key, value.strip(), types[key])
    return out


def plan_to_evaluate(text: str, *, world: int, workload: Workload, precision: str) -> Plan:
    """The plan `--evaluate` names, with dp inferred and plait's launch checks applied."""
    fields = {"precision": precision} | parse_plan_fields(text)
    return checked_plan(Plan(**fields), world=world, workload=workload)  # type: ignore[arg-type]


def checked_plan(plan: Plan, *, world: int, workload: Workload) -> Plan:
    """`plan` with dp inferred and plait's own launch checks applied (what `plait train` would refuse)."""
    plan = plan.resolve(world)
    plan.check_available()
    Config(plan=plan, train=TrainConfig(global_batch=workload.global_batch)).check_batching(plan.dp)
    return plan


def fit_reason(est: Estimate, *, device_memory: int) -> str:
    """Why the plan fits or does not: its peak against the device, and the parts that make it up."""
    m = est.memory
    parts = {
        "model states": m.model_states, "activations": m.activations, "working buffers": m.working + m.comm,
        "reserved": m.reserved,
    }  # fmt: skip
    largest = ", ".join(f"{name} {size / GIB:.2f}" for name, size in sorted(parts.items(), key=lambda kv: -kv[1]))
    margin = (device_memory - m.total) / GIB
    peak = f"the busiest rank (stage {m.stage}) peaks at {m.total / GIB:.2f} GiB"
    if est.fits:
        return f"fits: {peak}, {margin:.2f} GiB spare ({largest} GiB)"
    if margin >= 0:
        return (
            f"does not fit: {peak} on the device, but its offloaded states lack room (host {m.host / GIB:.2f} GiB, "
            f"disk {m.disk / GIB:.2f} GiB per rank)"
        )
    return f"does not fit: {peak}, {-margin:.2f} GiB over {device_memory / GIB:.1f} GiB ({largest} GiB)"


def _traffic(name: str, traffic: Traffic) -> str:
    return (
        f"  {name}: host->device {traffic.h2d / 1e9:.2f} GB, device->host {traffic.d2h / 1e9:.2f} GB, "
        f"disk read {traffic.disk_read / 1e9:.2f} GB, disk write {traffic.disk_write / 1e9:.2f} GB"
    )


def format_estimate(est: Estimate, *, device_memory: int) -> str:
    """One plan's estimate: memory per tier, I/O per step, step time by part."""
    m, t = est.memory, est.time
    lines = [
        f"plan: {describe(est.plan)} ({'fits' if est.fits else 'does NOT fit'})",
        f"memory per rank: device {m.total / GIB:.2f} GiB of {device_memory / GIB:.1f} (model states "
        f"{m.model_states / GIB:.2f}, activations {m.activations / GIB:.2f}, working {(m.working + m.comm) / GIB:.2f}, "
        f"reserved {m.reserved / GIB:.2f}); host {m.host / GIB:.2f} GiB; disk {m.disk / GIB:.2f} GiB",
    ]
    if est.offload is not None:
        lines.append(f"states: {describe_tiers(est.offload)}")
        lines.append("offload I/O per step per rank:")
        lines.append(_traffic("during forward/backward", est.offload.during))
        lines.append(_traffic("after backward (optimizer)", est.offload.after))
    parts = ", ".join(f"{k} {v:.3g}" for k, v in t.as_dict().items() if k != "total" and v)
    lines.append(f"step: {est.step_s:.3g} s ({parts}); {est.tokens_per_s:,.0f} tokens/s; MFU {100 * est.mfu:.1f}%")
    lines.append(fit_reason(est, device_memory=device_memory))
    return "\n".join(lines)
