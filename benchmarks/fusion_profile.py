"""Where a compiled dp=2 step spends its time: plait ZeRO-0 compiled vs torch DDP + per-block compile.

Both train bench-dp (fusion.py's systems, same weights and batches) on 2 ranks of 1 thread; after
warm-up steps, rank 0 profiles `--steps` steps of each (torch.profiler, CPU) while rank 1 steps
alongside. Every op's self CPU time on rank 0's main thread is put in one region, from the op's
phase (its nearest profiled ancestor: a compiled block's forward or backward, another backward
function, gradient accumulation, the optimizer) and its kind (matmul, attention, cast/copy,
zero/fill, collective, ...). Per step, in ms:

    region totals, side by side, and plait minus DDP;
    wall (between barriers), main-thread CPU time (time.thread_time), and wall - profiled ops
    (waits on collectives, Python).

    python benchmarks/fusion_profile.py                 # fp32 and bf16 (where the CPU has bf16 units)
    python benchmarks/fusion_profile.py --precisions fp32 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import RESULTS_DIR, environment, format_table, load_average, run_ranks, write_json
from fusion import PRESET, WORLD_SIZE, BenchConfig, has_bf16_units, make_system
from profile_regions import profile_steps

from plait.models import build

SYSTEMS = ("plait-compiled", "ddp-compiled")


@dataclass(frozen=True)
class ProfileConfig:
    precisions: tuple[str, ...] = ("fp32", "bf16")
    warmup: int = 2
    steps: int = 2
    batch: int = 4
    seq: int = 128
    d_model: int | None = None
    layers: int | None = None

    def bench(self) -> BenchConfig:
        return BenchConfig(batch=self.batch, seq=self.seq, d_model=self.d_model, layers=self.layers)


def rank_main(rank: int, world_size: int, config: ProfileConfig) -> dict[str, Any]:
    bench = config.bench()
    out: dict[str, Any] = {}
    for precision in config.precisions:
        torch.manual_seed(0)
        base = build(PRESET, **bench.model_overrides())
        gen = torch.Generator().manual_seed(17 + rank)
        ids = torch.randint(0, base.config.vocab_size, (config.batch, config.seq), generator=gen)
        batch = {"input_ids": ids, "labels": ids}
        for name in SYSTEMS:
            system = make_system(name, copy.deepcopy(base), group="zero0", precision=precision)
            for _ in range(config.warmup):
                system.step(batch).item()
            out[f"{precision}/{name}"] = {"load_before": load_average()} | profile_steps(
                lambda system=system, batch=batch: system.step(batch).item(), rank=rank, steps=config.steps
            )
            del system
    return out


def cpu_scaled(table: dict[str, Any], field: str) -> dict[str, float]:
    """A region's profiled (wall) ms times main-thread CPU ms / profiled ms: its CPU time if the waits
    for a core that other processes took fell evenly over the regions (a first-order correction)."""
    factor = table["cpu_ms"] / table["profiled_ms"]
    return {k: v * factor for k, v in table[field].items()}


def report(result: dict[str, Any], config: ProfileConfig) -> dict[str, Any]:
    diffs: dict[str, Any] = {}
    for precision in config.precisions:
        plait, ddp = result[f"{precision}/plait-compiled"], result[f"{precision}/ddp-compiled"]
        print(f"\n== {precision}: ms per step on rank 0 (profiled self time of the main thread's ops) ==")
        for field in ("by_phase", "by_kind", "by_phase_kind"):
            a, b = plait[field], ddp[field]
            sa, sb = cpu_scaled(plait, field), cpu_scaled(ddp, field)
            keys = sorted(set(a) | set(b), key=lambda k: -a.get(k, 0))
            rows = [
                [k, f"{a.get(k, 0):.1f}", f"{b.get(k, 0):.1f}", f"{a.get(k, 0) - b.get(k, 0):+.1f}",
                 f"{sa.get(k, 0):.1f}", f"{sb.get(k, 0):.1f}", f"{sa.get(k, 0) - sb.get(k, 0):+.1f}"]
                for k in keys
                if max(a.get(k, 0), b.get(k, 0)) >= 0.5
            ]  # fmt: skip
            print(format_table([field, "plait", "ddp", "plait-ddp", "plait cpu~", "ddp cpu~", "diff cpu~"], rows))
        totals = ("wall_ms", "cpu_ms", "profiled_ms", "unprofiled_wall_ms", "other_threads_ms")
        rows = [[k, f"{plait[k]:.1f}", f"{ddp[k]:.1f}", f"{plait[k] - ddp[k]:+.1f}"] for k in totals]
        print(format_table(["total", "plait", "ddp", "plait-ddp"], rows))
        print("cpu~: scaled to main-thread CPU time (cpu_ms / profiled_ms), for a loaded machine")
        diffs[precision] = {
            field: {k: plait[field].get(k, 0) - ddp[field].get(k, 0) for k in set(plait[field]) | set(ddp[field])}
            for field in ("by_phase", "by_kind", "by_phase_kind")
        } | {k: plait[k] - ddp[k] for k in totals}
        diffs[precision]["by_phase_cpu_scaled"] = {
            k: cpu_scaled(plait, "by_phase").get(k, 0) - cpu_scaled(ddp, "by_phase").get(k, 0)
            for k in set(plait["by_phase"]) | set(ddp["by_phase"])
        }
    return diffs


def parse_args(argv: list[str] | None) -> tuple[ProfileConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None)
    parser.add_argument("--steps", type=int, default=4, help="profiled steps per system")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke check")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    precisions = tuple(args.precisions or (("fp32", "bf16") if has_bf16_units() else ("fp32",)))
    tiny = {"d_model": 128, "layers": 2, "seq": 64} if args.quick else {}
    config = ProfileConfig(precisions=precisions, warmup=args.warmup, steps=args.steps, **tiny)
    name = "fusion-profile-quick.json" if args.quick else "fusion-profile.json"
    return config, args.out or RESULTS_DIR / name


def main(argv: list[str] | None = None) -> int:
    config, out_path = parse_args(argv)
    load_start, started = load_average(), time.perf_counter()
    results = run_ranks(rank_main, WORLD_SIZE, config, num_threads=1, timeout_s=1500)
    diffs = report(results[0], config)
    payload = {
        "benchmark": "fusion_profile",
        "config": {**asdict(config), "preset": PRESET, "world_size": WORLD_SIZE, "threads_per_rank": 1},
        "environment": environment(),
        "load_average": {"start": load_start, "end": load_average()},
        "wall_s": time.perf_counter() - started,
        "rank0": results[0],
        "plait_minus_ddp_ms": diffs,
    }
    print(f"\nwrote {write_json(out_path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
