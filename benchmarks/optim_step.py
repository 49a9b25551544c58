"""Optimizer step time against the number of tensors the same elements are split into.

Work: `--elements` fp32 parameters (default 4M, the bench models' size) split into k equal 1-D views of
one flat buffer, as a ZeRO rank's optimizer sees its pieces of the flat master shard, with gradients
viewing one flat gradient buffer; one thread. Systems: torch AdamW fused and foreach (the floor: the
memory-bound update), plait's Lamb and Lars. Each repetition steps every system once, in a rotated order, so the machine's drift
falls on all alike; the figure is the median over `--repeats` steps after one warm-up step.

    python benchmarks/optim_step.py                 # k = 1 .. 1024, ~1 min on one quiet core
    python benchmarks/optim_step.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import RESULTS_DIR, environment, finish, format_table, load_average

from plait.optim import Lamb, Lars

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def systems() -> dict[str, Factory]:
    found: dict[str, Factory] = {
        "adamw fused": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, fused=True),
        "adamw foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, foreach=True),
        "plait lamb": lambda p: Lamb(p, lr=1e-3, weight_decay=0.01),
        "plait lars": lambda p: Lars(p, lr=1e-3, weight_decay=1e-4),
    }
    return found


def pieces(num_elements: int, num_tensors: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    flat, grad_flat = torch.randn(num_elements, generator=gen), torch.randn(num_elements, generator=gen)
    size = num_elements // num_tensors
    params = []
    for i in range(num_tensors):
        param = torch.nn.Parameter(flat[i * size : (i + 1) * size])
        param.grad = grad_flat[i * size : (i + 1) * size]
        params.append(param)
    return params


def measure(num_tensors: int, args: argparse.Namespace) -> dict[str, float]:
    optimizers = {name: make(pieces(args.elements, num_tensors)) for name, make in systems().items()}
    for optimizer in optimizers.values():
        optimizer.step()  # states allocated
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            start = time.perf_counter()
            optimizers[name].step()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=4 * 2**20)
    parser.add_argument("--tensors", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="256k elements, k = 1 and 64, 3 repeats")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.elements, args.tensors, args.repeats = 2**18, [1, 64], 3
    torch.set_num_threads(1)
    started, load_before = time.perf_counter(), load_average()
    results = {k: measure(k, args) for k in args.tensors}
    names = list(next(iter(results.values())))
    print(f"{args.elements:,} fp32 parameters in k tensors, 1 thread; load {load_before} -> {load_average()}")
    rows = [[f"k = {k}", *(f"{results[k][name] * 1e3:.2f}" for name in names)] for k in args.tensors]
    print(format_table(["step ms", *names], rows))
    payload: dict[str, Any] = {
        "environment": environment(),
        "args": vars(args),
        "load_average": {"before": load_before, "after": load_average()},
        "seconds": {str(k): value for k, value in results.items()},
    }
    out = args.out or RESULTS_DIR / ("optim_step-quick.json" if args.quick else "optim_step.json")
    wall = time.perf_counter() - started
    finish(out, payload, wall_s=wall, phase_wall_s={"measure": wall})


if __name__ == "__main__":
    main()
