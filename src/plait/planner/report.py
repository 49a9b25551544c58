"""Text for people: the ranked table, why the best plan wins, and what to change when nothing fits."""

from __future__ import annotations

from plait.planner.estimate import Estimate, describe, describe_tiers
from plait.planner.search import SearchResult

GIB = 2**30
_PARTS = {
    "compute": "compute",
    "tp_comm": "tensor-parallel communication",
    "ep_comm": "expert-parallel all-to-all",
    "bubble": "pipeline bubble",
    "pp_comm": "pipeline transfers",
    "dp_comm_exposed": "unhidden data-parallel communication",
    "optimizer": "optimizer step",
    "offload_io": "unhidden offload I/O",
}


def format_table(result: SearchResult, *, top: int = 10) -> str:
    """The `top` fitting plans (or the smallest-memory ones when none fits), one line each: device memory
    per rank in GiB (with the runtime's reserve), its model states, activations and peak working buffers;
    with offload also host and disk GiB per rank and the GB each rank moves per step over PCIe and disk."""
    rows = result.fitting[:top] or result.estimates[:top]
    offloads = any(est.offload is not None for est in rows)
    headers = ("#", "plan", "mem/rank GiB", "states", "activ.", "work", "step s", "tokens/s", "MFU")
    headers += ("host GiB", "disk GiB", "I/O GB") if offloads else ()
    lines = [_row(headers)]
    for index, est in enumerate(rows, 1):
        m = est.memory
        cells = (
            str(index), describe(est.plan), f"{m.total / GIB:.2f}", f"{m.model_states / GIB:.2f}",
            f"{m.activations / GIB:.2f}", f"{(m.working + m.comm) / GIB:.2f}", f"{est.step_s:.3g}", f"{est.tokens_per_s:,.0f}", f"{100 * est.mfu:.1f}%",
        )  # fmt: skip
        if offloads:
            io = est.offload.per_step.total / 1e9 if est.offload is not None else 0.0
            cells += (f"{m.host / GIB:.2f}", f"{m.disk / GIB:.2f}", f"{io:.1f}")
        lines.append(_row(cells))
    return "\n".join(lines)


def _row(cells: tuple[str, ...]) -> str:
    widths = (3, 56, 13, 8, 8, 8, 9, 12, 7, 9, 9, 8)[: len(cells)]
    return "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def _largest_gaps(best: Estimate, other: Estimate, *, count: int = 2) -> list[str]:
    ours, theirs = best.time.as_dict(), other.time.as_dict()
    gaps = sorted(_PARTS, key=lambda k: ours[k] - theirs[k])
    scale = max(best.step_s, other.step_s)
    return [
        f"{_PARTS[k]} {ours[k]:.3g} s vs {theirs[k]:.3g} s"
        for k in gaps[:count]
        if abs(ours[k] - theirs[k]) > 1e-3 * scale
    ]


def _offload_text(est: Estimate) -> str:
    """'; host 12.3 GiB, disk 0.00 GiB per rank; 45.6 GB per step over PCIe and disk (offload plans only)."""
    if est.offload is None:
        return ""
    m, io = est.memory, est.offload.per_step
    return (
        f"; host {m.host / GIB:.2f} GiB, disk {m.disk / GIB:.2f} GiB per rank ({describe_tiers(est.offload)}); "
        f"per step {(io.h2d + io.d2h) / 1e9:.1f} GB over PCIe, {(io.disk_read + io.disk_write) / 1e9:.1f} GB "
        f"disk I/O, {est.time.offload_io:.3g} s of it not hidden, host optimizer {est.time.optimizer:.3g} s"
    )


def why_best(result: SearchResult) -> str:
    """Why the top plan beats the runner-up and the fastest plan of other shapes (other tp/pp)."""
    best = result.best
    if best is None:
        return "no plan fits"
    lines = [
        f"best: {describe(best.plan)}: {best.step_s:.3g} s/step, {best.memory.total / GIB:.2f} GiB of "
        f"{result.cluster.device_memory / GIB:.0f} GiB per device" + _offload_text(best)
    ]
    rivals = result.fitting[1:2]
    seen = {(e.plan.tp, e.plan.pp) for e in [best, *rivals]}
    for est in result.fitting[2:]:
        if (est.plan.tp, est.plan.pp) not in seen:
            seen.add((est.plan.tp, est.plan.pp))
            rivals.append(est)
        if len(rivals) >= 4:
            break
    for est in rivals:
        slower = est.step_s / best.step_s - 1
        reasons = "; ".join(_largest_gaps(best, est)) or "the same time parts"
        lines.append(f"  vs {describe(est.plan)}: {100 * slower:.1f}% slower ({reasons})")
    too_big = [e for e in result.estimates if not e.fits and e.step_s < best.step_s]
    if too_big:
        fastest = min(too_big, key=lambda e: e.step_s)
        lines.append(
            f"  faster but does not fit: {describe(fastest.plan)} ({fastest.step_s:.3g} s/step, "
            f"{fastest.memory.total / GIB:.2f} GiB)"
        )
    return "\n".join(lines)
