"""Context parallel memory: at a fixed per-rank budget, the longest sequence that trains at cp = 1, 2, 4,
and each rank's measured bytes against the planner's formula (plait.planner.activations).

Work: a Llama-style GPT (d_model 128, 4 heads, 2 kv heads, 4 layers, vocab 512), fp32 AdamW,
ZeRO-1, one row per step, world = cp (forked gloo ranks of one thread each).

Per cp, each probe at `seq` tokens builds the engine, runs one step (its peak RSS above the RSS after
set-up is recorded too, with glibc's mmap threshold pinned so freed memory leaves RSS), then a second
step under torch.profiler: the peak of live tensor bytes (plait.train.metrics.peak_live_tensor_bytes:
model states, activations, working memory; not the runtime or the allocator's caching), the worst
rank's. A sequence "trains within the budget" when that peak is at most `--budget-mib`. The search
starts where the planner's formula puts the longest sequence, steps out until it brackets the
answer, then bisects on a grid of `--grid` tokens. The formula's figure at each probe comes from
`plait.planner.Estimator` (tensors = model states + activations + working memory); "activations"
below are the peak minus the step's starting live bytes (measured) and the formula's activations +
working memory.

    python benchmarks/context_memory.py            # ~5 min on 2 quiet cores
    python benchmarks/context_memory.py --quick    # a smoke check
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import (
    RESULTS_DIR,
    current_rss_bytes,
    environment,
    finish,
    format_table,
    load_average,
    peak_rss_bytes,
    reset_peak_rss,
    run_ranks,
)

import plait
from plait.planner import Cluster, Estimator, ModelShape, Workload
from plait.train.metrics import live_tensor_bytes, peak_live_tensor_bytes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt options
MODEL = {"d_model": 128, "num_heads": 4, "num_kv_heads": 2, "num_layers": 4, "vocab_size": 512}
MIB = 2**20


def plan_for(cp: int) -> plait.Plan:
    return plait.Plan(dp=1, cp=cp, zero=1)


def formula(cp: int, seq: int) -> dict[str, float]:
    """The planner's bytes per rank for one row of `seq` tokens at `cp`."""
    config = plait.models.build("tiny-llama", max_seq_len=seq, **MODEL).config
    cluster = Cluster.preset("h100", devices_per_node=cp)
    memory = Estimator(ModelShape(config), Workload(1, seq), cluster=cluster).estimate(plan_for(cp)).memory
    return {
        "tensors": memory.tensors,
        "states": memory.model_states,
        "activations": memory.tensors - memory.model_states,
    }


def formula_longest(cp: int, *, budget: float, grid: int, limit: int) -> int:
    """The longest multiple of `grid` tokens whose formula fits `budget` (the formula grows with seq)."""
    lo, hi = 0, limit // grid
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if formula(cp, mid * grid)["tensors"] <= budget else (lo, mid - 1)
    return lo * grid


def return_freed_memory() -> None:
    """Large blocks from mmap, returned on free, so one probe's freed memory does not hide the next one's peak."""
    libc = ctypes.CDLL("libc.so.6")
    for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
        libc.mallopt(option, 128 * 1024)


def worst(value: float) -> float:
    tensor = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def probe(cp: int, seq: int) -> dict[str, Any]:
    """One engine at `seq` tokens: the first step's RSS peak, the second step's live-tensor peak (worst rank).

    Live bytes count from what is alive before the engine is built: an engine with ZeRO units is not
    freed when dropped (its gradient hooks, held by the parameters, close over it), so earlier probes'
    states stay alive in this process and are not this probe's.
    """
    gc.collect()
    inherited = live_tensor_bytes()
    torch.manual_seed(0)
    model = plait.models.build("tiny-llama", max_seq_len=seq, **MODEL)
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-4, eps=1e-6)  # noqa: E731
    engine = plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan_for(cp))
    ids = torch.randint(0, MODEL["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone()}
    gc.collect()
    before = current_rss_bytes() or 0
    reset_peak_rss()
    start = time.perf_counter()
    engine.train_step(batch)
    rss = (peak_rss_bytes() or 0) - before
    gc.collect()
    live = peak_live_tensor_bytes(lambda: engine.train_step(batch))
    point = {
        "seq": seq,
        "peak_bytes": worst(live["peak"] - inherited),
        "start_bytes": worst(live["start"] - inherited),
        "activation_bytes": worst(live["peak"] - live["start"]),
        "state_bytes": worst(engine.state_bytes()["total"]),
        "first_step_rss_bytes": worst(rss),
        "seconds": time.perf_counter() - start,
    }
    return point  # the engine goes with this frame


def search_main(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    return_freed_memory()
    cp, grid, budget = world_size, args.grid, args.budget_mib * MIB
    points: dict[int, dict[str, Any]] = {}

    def fits(seq: int) -> bool:
        if seq not in points:
            points[seq] = probe(cp, seq)
            if rank == 0:
                p = points[seq]
                print(f"  cp={cp} seq={seq}: peak {p['peak_bytes'] / MIB:.1f} MiB ({p['seconds']:.1f} s)", flush=True)
        return points[seq]["peak_bytes"] <= budget

    guess = max(grid, formula_longest(cp, budget=budget, grid=grid, limit=args.limit))
    step = grid
    if fits(guess):  # bracket [lo fits, hi does not], stepping out by doubling strides
        lo, hi = guess, guess + step
        while fits(hi):
            lo, step = hi, 2 * step
            hi = lo + step
    else:
        lo, hi = guess - step, guess
        while lo > 0 and not fits(lo):
            hi, step = lo, 2 * step
            lo = max(0, hi - step)
    while hi - lo > grid:  # bisection on the grid
        mid = (lo + hi) // 2 // grid * grid
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"longest": lo, "formula_longest": guess, "points": sorted(points.values(), key=lambda p: p["seq"])}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for cp, result in results["by_cp"].items():
        points = result["points"]
        seqs = [p["seq"] for p in points]
        line = ax.plot(seqs, [p["peak_bytes"] / MIB for p in points], "o", label=f"cp={cp} measured")[0]
        ax.plot(
            seqs,
            [p["formula"]["tensors"] / MIB for p in points],
            "--",
            color=line.get_color(),
            label=f"cp={cp} formula",
        )
    ax.axhline(results["args"]["budget_mib"], color="red", linestyle=":", label="budget")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak live tensor MiB per rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget-mib", type=float, default=256.0)
    parser.add_argument("--grid", type=int, default=256, help="sequence lengths searched: multiples of this")
    parser.add_argument("--limit", type=int, default=65536, help="longest sequence the formula's search considers")
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.budget_mib, args.cps = 48.0, [1, 2]
    started = time.perf_counter()
    load = {"start": load_average()}
    by_cp, phase = {}, {}
    for cp in args.cps:
        phase_start = time.perf_counter()
        by_cp[cp] = run_ranks(search_main, cp, args)[0]
        phase[f"cp{cp}"] = time.perf_counter() - phase_start
    load["end"] = load_average()
    for cp, result in by_cp.items():
        for point in result["points"]:
            point["formula"] = formula(cp, point["seq"])
    base = by_cp[args.cps[0]]["longest"]
    rows = []
    for cp, result in by_cp.items():
        at = next(p for p in result["points"] if p["seq"] == result["longest"])
        result["ratio"] = result["longest"] / base if base else None
        f = at["formula"]
        rows.append([
            f"cp={cp}", result["longest"], f"{result['ratio']:.2f}x", result["formula_longest"], len(result["points"]),
            f"{at['peak_bytes'] / MIB:.1f}", f"{f['tensors'] / MIB:.1f}", f"{at['activation_bytes'] / MIB:.1f}",
            f"{f['activations'] / MIB:.1f}", f"{f['tensors'] / at['peak_bytes']:.3f}", f"{at['first_step_rss_bytes'] / MIB:.0f}",
        ])  # fmt: skip
    print(f"\nbudget {args.budget_mib:.0f} MiB of live tensors per rank, grid {args.grid} tokens; load average {load}")
    headers = ["plan", "longest", "vs cp1", "formula's", "probes", "peak MiB", "formula MiB", "act MiB",
               "formula act", "formula/peak", "1st-step RSS MiB"]  # fmt: skip
    print(format_table(headers, rows))
    stem = "context_memory-quick" if args.quick else "context_memory"
    out = args.out or RESULTS_DIR / f"{stem}.json"
    payload = {
        "environment": environment(),
        "args": vars(args) | {"out": str(out)},
        "model": MODEL,
        "load_average": load,
        "by_cp": by_cp,
    }
    plot(payload, out.with_suffix(".png"))
    finish(out, payload, wall_s=time.perf_counter() - started, phase_wall_s=phase)


if __name__ == "__main__":
    sys.exit(main())
