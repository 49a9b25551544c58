"""ZeRO-3 under a pipeline: gather each unit per micro-batch, or once per step.

Work: a GPT (d_model 256, 8 layers, vocab 8192, seq 128), dp=2 x pp=2 (4 forked gloo ranks of one
thread), ZeRO-3, fp32 AdamW, 1F1B, m micro-batches of 2 sequences per dp rank, for m in {4, 8}.
Per mode and m, A B A B alternated in the same rank processes:
- tokens/s (median of the timed steps, every step between barriers);
- all-gather bytes per step per rank, counted by plait, next to the formula: "step" gathers each of
  the stage's units once (U bytes), "microbatch" twice per micro-batch (2 m U);
- the peak of parameter elements a rank held at once (ZeRO-3's shards plus gathered units), as
  bytes, next to the stage's full parameters (what "step" holds) and its shard.

    python benchmarks/zero3_pipeline.py               # ~3 min on 2 quiet cores
    python benchmarks/zero3_pipeline.py --quick       # the tiny model, a smoke check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    environment,
    finish,
    format_bytes,
    format_table,
    load_average,
    ratio_summary,
    run_alternating,
    run_ranks,
    timed_block,
)

import plait

WORLD_SIZE = 4
MODES = ("microbatch", "step")
SEQUENCES_PER_MICROBATCH = 2


def model_kwargs(quick: bool) -> dict[str, Any]:
    if quick:
        return {"preset": "tiny", "max_seq_len": 32, "num_layers": 4}
    return {"preset": "tiny", "d_model": 256, "num_heads": 4, "num_layers": 8, "vocab_size": 8192, "max_seq_len": 128}


def build_engine(mode: str, *, microbatches: int, quick: bool) -> tuple[plait.Engine, Any]:
    """The engine and its model's config."""
    kwargs = model_kwargs(quick)
    torch.manual_seed(0)
    model = plait.models.build(kwargs.pop("preset"), **kwargs)
    plan = plait.Plan(dp=2, pp=2, zero=3, microbatches=microbatches, zero3_gather=mode, pp_schedule="1f1b")
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-4, eps=1e-6)  # noqa: E731
    return plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan), model.config


def make_batch(config: Any, *, microbatches: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    rows = SEQUENCES_PER_MICROBATCH * microbatches
    ids = torch.randint(0, config.vocab_size, (rows, config.max_seq_len + 1), generator=generator)
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


def measure(engine: plait.Engine, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One counted step: all-gather bytes and the parameter elements held at once."""
    zero = engine.data_parallel
    engine.comm.reset()
    zero.peak_held_elements = 0
    engine.train_step(batch)
    units = zero.units
    element = units[0].full.element_size()
    return {
        "all_gather_bytes": engine.comm.bytes_by_kind["all_gather"],
        "unit_bytes": sum(u.layout.padded_numel for u in units) * element,
        "shard_bytes": sum(u.layout.shard_size for u in units) * element,
        "peak_held_bytes": zero.peak_held_elements * element,
    }


def time_modes(
    engines: dict[str, plait.Engine], batch: dict[str, torch.Tensor], *, args: argparse.Namespace
) -> tuple[dict[str, Any], list[float | None]]:
    """Seconds per step of each mode, A B A B; and the load average before each block."""
    loads: list[float | None] = []

    def block(mode: str) -> float:
        loads.append(load_average())
        return timed_block(lambda: [engines[mode].train_step(batch) for _ in range(args.steps)])[0] / args.steps

    return run_alternating({mode: (lambda m=mode: block(m)) for mode in MODES}, num_pairs=args.pairs), loads


def rank_main(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for microbatches in args.microbatches:
        built = {mode: build_engine(mode, microbatches=microbatches, quick=args.quick) for mode in MODES}
        engines = {mode: engine for mode, (engine, _) in built.items()}
        config = built["step"][1]
        batch = make_batch(config, microbatches=microbatches)
        counted = {mode: measure(engine, batch) for mode, engine in engines.items()}  # also the warm-up step
        timed, loads = time_modes(engines, batch, args=args)
        tokens = SEQUENCES_PER_MICROBATCH * microbatches * config.max_seq_len * 2  # dp=2
        out[str(microbatches)] = {
            "counted": counted,
            "seconds": timed["seconds"],
            "tokens_per_step": tokens,
            "tokens_per_s": {mode: tokens / statistics.median(s) for mode, s in timed["seconds"].items()},
            "step_over_microbatch": ratio_summary(timed["seconds"]["microbatch"], timed["seconds"]["step"]),
            "load_average": loads,
        }
    return out


def report(results: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for microbatches, entry in results[0].items():
        for mode in MODES:
            per_rank = [r[microbatches]["counted"][mode] for r in results]
            theory = [(1 if mode == "step" else 2 * int(microbatches)) * c["unit_bytes"] for c in per_rank]
            rows.append([
                f"m={microbatches} {mode}",
                f"{entry['tokens_per_s'][mode]:,.0f}",
                " / ".join(format_bytes(c["all_gather_bytes"]) for c in per_rank),
                "yes" if all(c["all_gather_bytes"] == t for c, t in zip(per_rank, theory, strict=True)) else "NO",
                " / ".join(format_bytes(c["peak_held_bytes"]) for c in per_rank),
                " / ".join(format_bytes(c["unit_bytes"]) for c in per_rank),
            ])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.steps, args.microbatches = 2, 1, [4]
    started = time.perf_counter()
    results = run_ranks(rank_main, WORLD_SIZE, args)
    headers = ["plan", "tokens/s", "all-gather B/step per rank", "= formula", "peak params held", "stage params"]
    print(format_table(headers, report(results)))
    for microbatches, entry in results[0].items():
        ratio = entry["step_over_microbatch"]
        print(
            f"m={microbatches}: step time microbatch/step = {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f})"
        )
    out = args.out or RESULTS_DIR / ("zero3-pipeline-quick.json" if args.quick else "zero3-pipeline.json")
    payload = {"environment": environment(), "args": vars(args) | {"out": str(out)}, "ranks": results}
    finish(out, payload, wall_s=time.perf_counter() - started, phase_wall_s={})


if __name__ == "__main__":
    sys.exit(main())
