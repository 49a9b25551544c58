"""Ideas for a faster compiled dp=2 step, each measured side by side against the code it would replace.

Each idea is a pair of plait ZeRO-0 systems (compiled blocks, bench-dp, fusion.py's batches) that
differ in one thing; the pair runs A B, B A, ... (plait.bench's pair_order), `--steps` timed
steps per block after one untimed step, on 2 ranks of 1 thread. Per pair: the wall ratio (between
barriers) and the ratio of rank 0's main-thread CPU seconds (robust to other work on the box),
with the load average. Ratios are before / after: above 1 means the idea is faster.

    baseline-noise  the same code twice (-bf16: in bf16): the spread any ratio below carries
    bf16-reduce     bf16 ZeRO-0: the 16-bit gradients cast straight into the fp32 gradient shard and
                    summed there, no fp32 shard zeroing (before: a cast to a temporary, its all-reduce,
                    a copy into the shard; the shard zeroed each step)
    compile-full    plan.compile "full" (embeddings, head with the blocks) vs "blocks"; -bf16 in bf16
    bucket-5mb      plan.bucket_mb 5 vs 25 (fp32: a smaller last bucket to wait for after backward)
    bf16-grads-into-fp32  an experiment (bf16_grads_into_fp32 below): each 16-bit gradient cast straight
                    into the fp32 shard as autograd produces it, vs the 16-bit buffer and its cast

Tried and dropped, their code gone (results/fusion-ideas-grad-copy-first.json, -math-attention.json):
fp32 gradients copied into their bucket views on the first accumulation instead of zeroing the buffers
(CPU 1.000); SDPA's math path for 16-bit CPU attention up to 128 tokens (CPU 1.080, but it keeps the
attention probabilities for backward, which the planner's memory model does not count).

    python benchmarks/fusion_ideas.py --ideas bf16-reduce compile-full --pairs 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    environment,
    format_table,
    load_average,
    pair_order,
    ratio_summary,
    run_ranks,
    write_json,
)
from fusion import PRESET, WORLD_SIZE, BenchConfig, optimizer

import plait
from plait.models import build
from plait.zero.flat import views_of


@dataclass(frozen=True)
class Variant:
    precision: str = "fp32"
    compile: str = "blocks"
    bucket_mb: float = 25.0
    tweak: str = ""  # a name in TWEAKS: restores code an idea replaced, on this engine's instances only


@dataclass(frozen=True)
class Idea:
    before: Variant
    after: Variant


IDEAS = {
    "baseline-noise": Idea(Variant(), Variant()),
    "baseline-noise-bf16": Idea(Variant(precision="bf16"), Variant(precision="bf16")),
    "bf16-reduce": Idea(Variant(precision="bf16", tweak="bf16-reduce-before"), Variant(precision="bf16")),
    "compile-full": Idea(Variant(), Variant(compile="full")),
    "compile-full-bf16": Idea(Variant(precision="bf16"), Variant(precision="bf16", compile="full")),
    "bucket-5mb": Idea(Variant(), Variant(bucket_mb=5.0)),
    "bf16-grads-into-fp32": Idea(Variant(precision="bf16"), Variant(precision="bf16", tweak="bf16-grads-into-fp32")),
}


def _cast_to_temporary(unit: Any) -> torch.Tensor:
    """The 16-bit stage-1 reduction before bf16-reduce: a cast into a fresh fp32 buffer (copied into the shard
    by finish_reduce)."""
    return unit.grad_full.to(unit.config.reduce_dtype)


def _zero_both(unit: Any) -> None:
    """zero_grads before bf16-reduce: the fp32 shard zeroed as well as the 16-bit full gradients."""
    unit.grad_shard.zero_()
    unit.grad_full.zero_()


def bf16_reduce_before(engine: Any) -> None:
    for unit in engine.data_parallel.units:
        unit._flat_grads = types.MethodType(_cast_to_temporary, unit)
        unit.zero_grads = types.MethodType(_zero_both, unit)


def bf16_grads_into_fp32(engine: Any) -> None:
    """An experiment for bf16 ZeRO-0 (not in plait: .grad would be None between steps, the 16-bit gradient
    buffer would go, and the memory model with it): each parameter's 16-bit gradient, as autograd hands it
    over, is cast into its view of the fp32 gradient shard (copied on the step's first micro-batch, added
    after), so there is no 16-bit add_ into a zeroed buffer and no cast of the whole buffer at the reduction."""
    zero = engine.data_parallel
    zero.remove_hooks()
    first: set[int] = set()
    for unit in zero.units:
        views = dict(zip(map(id, unit.params), views_of(unit.grad_shard, unit.layout), strict=True))
        for param in unit.params:
            param.register_post_accumulate_grad_hook(_move_grad(views[id(param)], first))
            first.add(id(param))
            param.grad = None
        unit._flat_grads = types.MethodType(lambda unit: unit.grad_shard, unit)
        unit.zero_grads = types.MethodType(_drop_grads(first), unit)
    zero._register_grad_hooks()  # after the moves: a unit is reduced once its last gradient has moved


def _move_grad(view: torch.Tensor, first: set[int]) -> Callable[[torch.Tensor], None]:
    def move(param: torch.Tensor) -> None:
        if id(param) in first:
            view.copy_(param.grad)
            first.discard(id(param))
        else:
            view.add_(param.grad)
        param.grad = None

    return move


def _drop_grads(first: set[int]) -> Callable[[Any], None]:
    def zero_grads(unit: Any) -> None:
        for param in unit.params:
            param.grad = None
            first.add(id(param))

    return zero_grads


TWEAKS: dict[str, Callable[[Any], None]] = {
    "bf16-grads-into-fp32": bf16_grads_into_fp32,
    "bf16-reduce-before": bf16_reduce_before,
}


@dataclass(frozen=True)
class IdeasConfig:
    ideas: tuple[str, ...] = ("baseline-noise", "bf16-reduce", "compile-full", "compile-full-bf16", "bucket-5mb")
    pairs: int = 5
    steps: int = 2
    batch: int = 4
    seq: int = 128

    def bench(self) -> BenchConfig:
        return BenchConfig(batch=self.batch, seq=self.seq)


def build_engine(model: torch.nn.Module, variant: Variant) -> Any:
    plan = plait.Plan(dp=WORLD_SIZE, precision=variant.precision, compile=variant.compile, bucket_mb=variant.bucket_mb)
    engine = plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan)
    if variant.tweak:
        TWEAKS[variant.tweak](engine)
    return engine


def measure_idea(rank: int, idea: Idea, config: IdeasConfig) -> dict[str, Any]:
    torch.manual_seed(0)
    base = build(PRESET, **config.bench().model_overrides())
    gen = torch.Generator().manual_seed(17 + rank)
    batches = []
    for _ in range(config.steps):
        ids = torch.randint(0, base.config.vocab_size, (config.batch, config.seq), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    engines = {"before": build_engine(copy.deepcopy(base), idea.before)}
    engines["after"] = build_engine(copy.deepcopy(base), idea.after)
    for engine in engines.values():  # compile and warm
        engine.train_step(batches[0]).loss.item()
    record: dict[str, Any] = {"wall_s": {"before": [], "after": []}, "cpu_s": {"before": [], "after": []}}
    record["losses"] = {"before": [], "after": []}
    record["load"] = []
    for pair in range(config.pairs):
        record["load"].append(load_average())
        for name in pair_order(pair, ["before", "after"]):
            engines[name].train_step(batches[0])  # untimed: re-fault what the other system used
            torch.distributed.barrier()
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            losses = [engines[name].train_step(b).loss.item() for b in batches]
            torch.distributed.barrier()
            record["wall_s"][name].append(time.perf_counter() - wall0)
            record["cpu_s"][name].append(time.thread_time() - cpu0)
            record["losses"][name].append(losses)
    return record


def rank_main(rank: int, world_size: int, config: IdeasConfig) -> dict[str, Any]:
    return {name: measure_idea(rank, IDEAS[name], config) for name in config.ideas}


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    wall, cpu = record["wall_s"], record["cpu_s"]
    return {
        "wall_before_over_after": ratio_summary(wall["before"], wall["after"]),
        "cpu_before_over_after": ratio_summary(cpu["before"], cpu["after"]),
        "median_wall_s": {k: statistics.median(v) for k, v in wall.items()},
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "load": record["load"],
        # the same step's loss under both: 0 where the idea keeps the arithmetic
        "max_loss_rel_diff": max(
            abs(a - b) / abs(b)
            for pa, pb in zip(record["losses"]["before"], record["losses"]["after"], strict=True)
            for a, b in zip(pa, pb, strict=True)
        ),
    }


def parse_args(argv: list[str] | None) -> tuple[IdeasConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ideas", nargs="+", choices=list(IDEAS), default=None)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per block")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fusion-ideas.json")
    args = parser.parse_args(argv)
    ideas = tuple(args.ideas) if args.ideas else IdeasConfig.ideas
    return IdeasConfig(ideas=ideas, pairs=args.pairs, steps=args.steps), args.out


def main(argv: list[str] | None = None) -> int:
    config, out_path = parse_args(argv)
    load_start, started = load_average(), time.perf_counter()
    results = run_ranks(rank_main, WORLD_SIZE, config, num_threads=1, timeout_s=3000)
    summary = {name: summarize(record) for name, record in results[0].items()}
    rows = []
    for name, entry in summary.items():
        wall, cpu = entry["wall_before_over_after"], entry["cpu_before_over_after"]
        rows.append(
            [name, f"{wall['median']:.3f} ({wall['min']:.3f}-{wall['max']:.3f})",
             f"{cpu['median']:.3f} ({cpu['min']:.3f}-{cpu['max']:.3f})",
             f"{entry['median_cpu_s']['before'] * 1e3 / config.steps:.0f} -> {entry['median_cpu_s']['after'] * 1e3 / config.steps:.0f}",
             f"{min(entry['load']):.1f}-{max(entry['load']):.1f}", f"{entry['max_loss_rel_diff']:.1e}"]
        )  # fmt: skip
    print(format_table(["idea", "wall before/after", "CPU before/after", "CPU ms/step", "load", "loss diff"], rows))
    payload = {
        "benchmark": "fusion_ideas",
        "config": {**asdict(config), "preset": PRESET, "world_size": WORLD_SIZE, "threads_per_rank": 1},
        "ideas": {name: {"before": asdict(IDEAS[name].before), "after": asdict(IDEAS[name].after)} for name in summary},
        "environment": environment(),
        "load_average": {"start": load_start, "end": load_average()},
        "wall_s": time.perf_counter() - started,
        "summary": summary,
        "rank0": results[0],
    }
    print(f"\nwrote {write_json(out_path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
