"""CPU attention at bench-dp's shapes: the fused flash kernel vs the math path, forward + backward.

Causal self-attention of (batch 4, heads 8, seq 128, head_dim 64), as one bench-dp layer runs it on
one rank, one thread: torch's SDPA under sdpa_kernel(FLASH_ATTENTION) and under sdpa_kernel(MATH),
eager and torch.compile'd, in fp32 and bf16. Rounds alternate the backends; the figure is the
median ms per forward + backward, and math/flash per round.

    python benchmarks/sdpa_backends.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import RESULTS_DIR, environment, format_table, load_average, ratio_summary, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def make_step(backend: str, *, dtype: torch.dtype, compiled: bool, shape: tuple[int, ...]) -> Any:
    fn = torch.compile(attention) if compiled else attention
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)

    def step() -> float:
        start = time.perf_counter()
        with sdpa_kernel(BACKENDS[backend]):
            out = fn(q, k, v)
            out.backward(grad)
        q.grad = k.grad = v.grad = None
        return time.perf_counter() - start

    return step


def measure(*, dtype: torch.dtype, compiled: bool, rounds: int, repeats: int, shape: tuple[int, ...]) -> dict:
    steps = {name: make_step(name, dtype=dtype, compiled=compiled, shape=shape) for name in BACKENDS}
    for step in steps.values():
        step(), step()  # compile, warm
    ms: dict[str, list[float]] = {name: [] for name in BACKENDS}
    for index in range(rounds):
        for name in list(BACKENDS)[:: 1 if index % 2 == 0 else -1]:
            ms[name].append(1e3 * statistics.median(steps[name]() for _ in range(repeats)))
    return {"ms": ms, "math_over_flash": ratio_summary(ms["math"], ms["flash"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="steps per round per backend (median)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sdpa-backends.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = (4, 8, 128, 64)
    load_start = load_average()
    results, rows = {}, []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for compiled in (False, True):
            key = f"{precision}-{'compiled' if compiled else 'eager'}"
            entry = measure(dtype=dtype, compiled=compiled, rounds=args.rounds, repeats=args.repeats, shape=shape)
            results[key] = entry
            med = {name: statistics.median(values) for name, values in entry["ms"].items()}
            ratio = entry["math_over_flash"]
            rows.append([key, f"{med['flash']:.2f}", f"{med['math']:.2f}",
                         f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})"])  # fmt: skip
    print(f"causal SDPA fwd+bwd, shape {shape}, 1 thread, load {load_start}")
    print(format_table(["run", "flash ms", "math ms", "math/flash"], rows))
    payload = {
        "benchmark": "sdpa_backends",
        "shape": shape,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "environment": environment(),
        "load_average": {"start": load_start, "end": load_average()},
        "results": results,
    }
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
