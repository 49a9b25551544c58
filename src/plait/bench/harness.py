"""The A/B harness behind `plait bench` and the side-by-side scripts in benchmarks/ (one copy).

What they encode (DESIGN.md, "Measuring"): these machines are noisy, so a
ratio against a peer comes from one run that alternates A B A B (the first
system of each pair alternates too, cancelling drift), and is reported as the
median of the per-pair ratios with its spread (min-max and IQR). Memory is the
model-state bytes counted from live tensors, plus the process's peak RSS over
the timed phase.

Ranks are forked and rendezvous through a FileStore in a temporary directory
(spawn costs 5-18 s per process here); results come back through pickle files.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from plait.bench.output import (  # noqa: F401  (re-exported: benchmarks and tests import them from here)
    environment,
    finish,
    format_bytes,
    format_table,
    load_average,
    wait_for_quiet,
    write_json,
    write_results,
)
from plait.distributed.forked import run_forked

# ---------------------------------------------------------------------------
# A/B alternation and statistics


def pair_order(pair_index: int, names: Sequence[str]) -> list[str]:
    """The order the two systems run in pair `pair_index`: A B, then B A, then A B..."""
    first, second = names
    return [first, second] if pair_index % 2 == 0 else [second, first]


def run_alternating(blocks: dict[str, Callable[[], float]], *, num_pairs: int) -> dict[str, Any]:
    """Run each of two timed blocks once per pair, alternating which goes first.

    `blocks` maps a system name to a callable that runs one block and returns
    its seconds. Every rank must call this with the same arguments so the
    collectives inside the blocks line up. Returns the seconds per system
    (index = pair) and the order each pair ran in.
    """
    if len(blocks) != 2:
        raise ValueError(f"run_alternating compares exactly two systems, got {list(blocks)}")
    names = list(blocks)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    orders = []
    for pair in range(num_pairs):
        order = pair_order(pair, names)
        orders.append(order)
        for name in order:
            seconds[name].append(blocks[name]())
    return {"seconds": seconds, "orders": orders}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the interquartile range (inclusive quartiles) of `values`."""
    values = list(values)
    if not values:
        raise ValueError("spread() needs at least one value")
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
    }


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, Any]:
    """Per-pair ratios numerator/denominator and their spread (the median ratio is the figure to quote)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"pairs disagree: {len(numerators)} vs {len(denominators)} values")
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return {"per_pair": ratios, **spread(ratios)}


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "SHORT"


# ---------------------------------------------------------------------------
# Memory


def _proc_status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """The peak resident set size (VmHWM) since start-up or the last `reset_peak_rss`."""
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def storage_bytes(tensors: Iterable[torch.Tensor | None], *, seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared storage count once).

    Pass the same `seen` set across calls to count a storage only in the first
    category that holds it.
    """
    seen = set() if seen is None else seen
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


def count_model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Params, grads and optimizer state of one rank, counted from the live tensors.

    Shared storage counts once (tied embeddings, gradients that are views into a
    flat bucket: the whole bucket counts, padding included).
    """
    seen: set[int] = set()
    params = list(model.parameters())
    counts = {
        "params": storage_bytes(params, seen=seen),
        "grads": storage_bytes((p.grad for p in params), seen=seen),
        "optimizer": storage_bytes(_optimizer_tensors(optimizer), seen=seen),
    }
    counts["total"] = sum(counts.values())
    return counts


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """plait's own count (`plait.train.metrics.model_state_bytes`) when it exists, else ours."""
    try:
        from plait.train.metrics import model_state_bytes as plait_count
    except ImportError:
        return count_model_state_bytes(model, optimizer)
    counted = plait_count(model, optimizer)
    if isinstance(counted, int):
        return {"total": counted}
    if hasattr(counted, "__dataclass_fields__"):
        counted = {name: getattr(counted, name) for name in counted.__dataclass_fields__}
    counted = dict(counted)
    counted.setdefault("total", sum(v for k, v in counted.items() if isinstance(v, int)))
    return counted


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's local part of a DTensor (FSDP2's sharded parameters, grads and Adam state); others as they are."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def count_local_model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """`count_model_state_bytes` for models whose tensors may be DTensors: counts each rank's local shards."""
    seen: set[int] = set()
    params = list(model.parameters())
    counts = {
        "params": storage_bytes((local_tensor(p) for p in params), seen=seen),
        "grads": storage_bytes((local_tensor(p.grad) for p in params if p.grad is not None), seen=seen),
        "optimizer": storage_bytes((local_tensor(t) for t in _optimizer_tensors(optimizer)), seen=seen),
    }
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------
# Forked ranks


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, num_threads: int = 1, timeout_s: float = 1800.0
) -> list[Any]:
    """Call fn(rank, world_size, *args) on forked gloo ranks, their output on this terminal; return
    each rank's (picklable) result. Call it before this process runs any torch op."""
    return run_forked(fn, world_size, *args, num_threads=num_threads, timeout_s=timeout_s, capture=False)


def timed_block(run: Callable[[], Any], *, group: dist.ProcessGroup | None = None) -> tuple[float, Any]:
    """Seconds between two barriers around `run()` (every rank waits for the slowest), and its return value."""
    dist.barrier(group=group)
    start = time.perf_counter()
    value = run()
    dist.barrier(group=group)
    return time.perf_counter() - start, value
