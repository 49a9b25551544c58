"""Where a step's time goes, from torch.profiler: every op's self time on the profiled rank's main thread,
put in one region by its phase (its nearest profiled ancestor: a compiled block's forward or backward,
another backward function, gradient accumulation, the optimizer; ops outside them by when they ran:
before the step's backward, inside it, after it) and its kind (matmul, attention, cast/copy,
zero/fill, collective, ...). Used by fusion.py and fusion_profile.py."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

STEP_LABEL = "profile_regions.step"

FORWARD_OTHER = "forward other (embeddings, head, loss)"
# phase of an op = the first of these its ancestors' names start with (innermost first)
PHASES = (
    ("Optimizer.step", "optimizer"),
    ("Optimizer.zero_grad", "zero_grad"),
    ("autograd::engine::evaluate_function: CompiledFunctionBackward", "backward blocks (compiled)"),
    ("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", "grad accumulate + hooks"),
    ("autograd::engine::evaluate_function: ToCopyBackward", "backward casts"),
    ("autograd::engine::evaluate_function: NllLoss", "loss backward"),
    ("autograd::engine::evaluate_function: LogSoftmax", "loss backward"),
    ("autograd::engine::evaluate_function:", "backward other (head, embeddings)"),
    ("CompiledFunctionBackward", "backward blocks (compiled)"),
    ("CompiledFunction", "forward blocks (compiled)"),
    ("Torch-Compiled Region", "forward blocks (compiled)"),
    ("DistributedDataParallel.forward", FORWARD_OTHER),
)
# kind of an op by its own name (first match)
KINDS = (
    (("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn"), "matmul"),
    (("flash_attention", "scaled_dot_product", "_efficient_attention"), "attention"),
    (("aten::_to_copy", "aten::to", "aten::copy_", "aten::clone", "aten::_copy"), "cast/copy"),
    (("aten::zero_", "aten::fill_", "aten::zeros", "aten::empty"), "zero/fill/alloc"),
    (("c10d", "gloo", "allreduce", "all_reduce", "nccl", "record_param_comms"), "collective"),
    (("_fused_adam", "_fused_adamw", "_foreach", "lerp", "addcdiv", "addcmul"), "optimizer kernel"),
    (("norm",), "norm"),
    (("log_softmax", "nll_loss", "cross_entropy"), "loss"),
    (("Call CompiledFxGraph", "inductor"), "compiled kernels"),
    (("aten::add_", "aten::add", "aten::mul_", "aten::mul", "aten::div"), "add/mul/div"),
)


def phase_of(event: Any, *, backward_windows: list[tuple[float, float, float, float]]) -> str:
    node = event
    while node is not None:
        for prefix, phase in PHASES:
            if node.name.startswith(prefix):
                return phase
        node = node.cpu_parent
    return _outside_blocks(event.time_range.start, backward_windows)


def _outside_blocks(start: float, windows: list[tuple[float, float, float, float]]) -> str:
    """An op in no recognised region: the eager forward (embeddings, head, loss) if it precedes its
    step's backward, the step's tail (scale, norm, zeroing, engine) if it follows it."""
    for step_start, lo, hi, step_end in windows:
        if not step_start <= start <= step_end:
            continue
        if start < lo:
            return FORWARD_OTHER
        return "backward other (head, embeddings)" if start <= hi else "step tail (scale, norm, zero, engine)"
    return "outside the steps"


def backward_windows(events: list[Any]) -> list[tuple[float, float, float, float]]:
    """(step start, first and last time of the autograd engine's functions, step end) of each profiled step."""
    windows = []
    for step in (e for e in events if e.name == STEP_LABEL):
        inside = [
            e.time_range
            for e in events
            if e.name.startswith("autograd::engine::evaluate_function")
            and step.time_range.start <= e.time_range.start <= step.time_range.end
        ]
        if inside:
            lo, hi = min(r.start for r in inside), max(r.end for r in inside)
            windows.append((step.time_range.start, lo, hi, step.time_range.end))
    return windows


def kind_of(name: str) -> str:
    for needles, kind in KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "other"


def regions(events: list[Any]) -> dict[str, Any]:
    """Self time (ms) of the main thread's ops by phase, by kind, and by (phase, kind), per profiled step; each
    figure is the median over the steps (an op's profiled time is wall time: a step where the core was taken
    by another process counts high, the median ignores it)."""
    thread = max({e.thread for e in events}, key=lambda t: sum(e.self_cpu_time_total for e in events if e.thread == t))
    windows = backward_windows(events)
    steps: list[dict[str, dict[str, float]]] = [defaultdict(lambda: defaultdict(float)) for _ in windows]
    other_threads = 0.0
    for event in events:
        if event.name == STEP_LABEL:
            continue
        ms = event.self_cpu_time_total / 1e3
        if event.thread != thread:
            other_threads += ms / max(len(windows), 1)
            continue
        index = next((i for i, w in enumerate(windows) if w[0] <= event.time_range.start <= w[3]), None)
        if index is None:
            continue
        phase, kind = phase_of(event, backward_windows=windows), kind_of(event.name)
        for field, key in (("by_phase", phase), ("by_kind", kind), ("by_phase_kind", f"{phase} | {kind}")):
            steps[index][field][key] += ms
        steps[index]["top_ops"][event.name[:70]] += ms
    out: dict[str, Any] = {}
    for field in ("by_phase", "by_kind", "by_phase_kind", "top_ops"):
        keys = {k for step in steps for k in step[field]}
        out[field] = {k: statistics.median(step[field].get(k, 0.0) for step in steps) for k in keys}
    out["top_ops"] = dict(sorted(out["top_ops"].items(), key=lambda kv: -kv[1])[:30])
    out["step_wall_ms"] = [(w[3] - w[0]) / 1e3 for w in windows]
    out["profiled_ms"] = statistics.median(sum(step["by_phase"].values()) for step in steps)
    out["other_threads_ms"] = other_threads
    return out


def profile_steps(step: Callable[[], Any], *, rank: int, steps: int) -> dict[str, Any]:
    """Profile `steps` calls of `step` on rank 0 (every rank calls it: the others run unprofiled); rank 0 gets
    its regions (median over the steps), wall and main-thread CPU ms per step, the others {}."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def run() -> None:
        for _ in range(steps):
            with record_function(STEP_LABEL):
                step()

    dist.barrier()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    if rank != 0:
        run()
        dist.barrier()
        return {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    cpu_ms = (time.thread_time() - cpu0) * 1e3 / steps
    wall_ms = (time.perf_counter() - wall0) * 1e3 / steps
    dist.barrier()
    table = regions(list(prof.events()))
    median_wall = statistics.median(table["step_wall_ms"])
    return {
        "wall_ms": median_wall,
        "mean_wall_ms": wall_ms,
        "cpu_ms": cpu_ms,
        "unprofiled_wall_ms": median_wall - table["profiled_ms"],
        **table,
    }
