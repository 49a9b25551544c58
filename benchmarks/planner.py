"""The planner against measurement: model-state bytes, peak live tensor bytes and step time per plan.

Work: a reference GPT (GPT-2 layout: d_model 256, 4 layers, 4 heads, vocab
4096, seq 128, tied embeddings; P = 4.24M), global batch 8 sequences, fp32
AdamW (fused, as `plait train` runs it), on 2 and 4 forked gloo ranks of one
thread each; the ep plans run a MoE variant (4 experts, top-2, dropless, in
every other layer). Plans cover data parallel and ZeRO 0-3, recomputation,
micro-batches, tp (with and without sequence parallel), pp (1F1B, GPipe), CPU
offload of the optimizer (and of ZeRO-3's parameters), cp=2, ep=2/4, and
ZeRO-3 x pp with each unit gathered once per step or per micro-batch. For
each world size:

1. `plait.planner.calibrate` measures this machine with that many ranks at
   once (matmul rate at the model's shapes, fused attention's rate, element-
   wise rate, cost per operator, all-reduce, all-gather and reduce-scatter
   times by size, overlap, each rank's share of a core, the host AdamW rate),
   median of 3 calibrations: the planner's cluster.
2. each plan is estimated (all of them before anything runs), then run in
   `--rounds` passes over all plans (drift on a shared machine hits each
   plan alike): `WARMUP_STEPS` warm-up steps, in the first pass one step under the
   allocator's events (peak live tensor bytes,
   `metrics.peak_live_tensor_bytes`), then `--steps` timed steps between
   barriers; the figure is the median over every pass's timed steps, each
   step's time the slowest rank's. Model-state bytes are
   `engine.state_bytes()` after the first step (offloaded plans: against the
   planner's device plus host bytes, as for the peak: on CPUs the host is the
   device). Memory figures are the
   busiest rank's. The 1-minute load average before each pass is recorded
   (other users' jobs show there).
3. accuracy: estimated/measured per plan; Spearman rank correlation of
   estimated vs measured step time (world 2, where ranks do not share a
   core, and all plans); the plan the planner picks among one model's
   measured plans against the fastest measured; DeepSpeed's own ZeRO estimators as a second
   opinion on model states where deepspeed is importable.

    python benchmarks/planner.py                # ~15 min on 2 cores (3 rounds)
    python benchmarks/planner.py --quick        # 2 plans per world, 3 steps
    python benchmarks/planner.py --worlds 2 --only 0 12   # some plans (development; writes planner-quick.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    environment,
    format_bytes,
    format_table,
    load_average,
    run_ranks,
    timed_block,
    write_json,
)

import plait
from plait.config import Plan
from plait.models.gpt_config import GPTConfig
from plait.planner import Cluster, Estimator, ModelShape, Workload, describe
from plait.planner.calibrate import Probe, calibrate
from plait.train.metrics import peak_live_tensor_bytes

REFERENCE = GPTConfig(vocab_size=4096, max_seq_len=128, d_model=256, num_layers=4, num_heads=4)
# The reference with 4 experts (top-2, dropless) in place of every other layer's MLP: the ep plans' model.
MOE = dataclasses.replace(REFERENCE, moe_experts=4, moe_every=2, moe_top_k=2)
MODELS = {"reference": REFERENCE, "moe": MOE}
SEQ_LEN = 128
GLOBAL_BATCH = 8
WARMUP_STEPS = 3  # steps before the timed ones: a fresh process's first steps still grow its heap (page faults)

PLANS: dict[int, list[dict[str, Any]]] = {
    2: [
        {"dp": 2, "zero": 0},
        {"dp": 2, "zero": 1},
        {"dp": 2, "zero": 2},
        {"dp": 2, "zero": 3},
        {"dp": 2, "zero": 0, "recompute": "full"},
        {"dp": 2, "zero": 2, "microbatches": 2},
        {"dp": 2, "zero": 1, "recompute": "selective", "recompute_ratio": 0.5},
        {"dp": 1, "tp": 2},
        {"dp": 1, "tp": 2, "sequence_parallel": True},
        {"dp": 1, "pp": 2, "microbatches": 4},
        {"dp": 1, "pp": 2, "microbatches": 4, "pp_schedule": "gpipe"},
        {"dp": 1, "pp": 2, "microbatches": 4, "recompute": "full"},
        {"dp": 2, "zero": 1, "offload_optimizer": "cpu"},
        {"dp": 2, "zero": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
        {"dp": 1, "cp": 2},
        {"model": "moe", "dp": 2, "zero": 1},
        {"model": "moe", "dp": 2, "ep": 2, "zero": 1},
    ],
    4: [
        {"dp": 4, "zero": 0},
        {"dp": 4, "zero": 3},
        {"dp": 2, "tp": 2, "zero": 1},
        {"dp": 2, "pp": 2, "microbatches": 2, "zero": 1},
        {"dp": 1, "tp": 2, "pp": 2, "microbatches": 4},
        {"dp": 1, "tp": 4},
        {"dp": 2, "pp": 2, "microbatches": 2, "zero": 3, "zero3_gather": "step"},
        {"dp": 2, "pp": 2, "microbatches": 2, "zero": 3, "zero3_gather": "microbatch"},
        {"dp": 4, "zero": 1, "offload_optimizer": "cpu"},
        {"dp": 2, "cp": 2, "zero": 1},
        {"model": "moe", "dp": 4, "ep": 2, "zero": 1},
        {"model": "moe", "dp": 4, "ep": 4, "zero": 1},
    ],
}


def split_options(options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A plan entry's model name ("reference" unless it says "model") and its Plan fields."""
    fields = dict(options)
    return fields.pop("model", "reference"), fields


def make_engine(plan: Plan, config: GPTConfig = REFERENCE) -> plait.Engine:
    torch.manual_seed(0)
    model = plait.models.build(config)
    return plait.boost(
        model,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4, fused=True),  # as plait train runs it
        loss_fn=plait.losses.causal_lm,
        plan=plan,
        max_grad_norm=1.0,
    )


def rank_batch(engine: plait.Engine) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(engine.dp_rank)
    tokens = torch.randint(0, REFERENCE.vocab_size, (GLOBAL_BATCH // engine.dp_size, SEQ_LEN), generator=generator)
    return {"input_ids": tokens, "labels": tokens}


def measure_plan(
    rank: int, world_size: int, plan: Plan, config: GPTConfig, num_steps: int, with_memory: bool
) -> dict[str, Any]:
    engine = make_engine(plan, config)
    batch = rank_batch(engine)
    engine.train_step(batch)
    states = engine.state_bytes()
    out: dict[str, Any] = {"states": states["total"], "states_detail": states}
    gc.collect()
    if with_memory:
        live = peak_live_tensor_bytes(lambda: engine.train_step(batch))
        out |= {"live_start": live["start"], "live_peak": live["peak"]}
    for _ in range(WARMUP_STEPS):
        engine.train_step(batch)
    out["seconds"] = [timed_block(lambda: engine.train_step(batch))[0] for _ in range(num_steps)]
    return out


def deepspeed_states(zero: int, *, num_params: int, largest_layer: int, dp: int) -> float | None:
    """DeepSpeed's own ZeRO-2/3 estimate of model-state bytes per GPU (mixed precision, no offload);
    None where deepspeed is not importable."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return None
    if zero == 2:
        return float(estimate_zero2_model_states_mem_needs(num_params, num_gpus_per_node=dp, cpu_offload=False)[1])
    return float(
        estimate_zero3_model_states_mem_needs(
            num_params, largest_layer, num_gpus_per_node=dp, cpu_offload=False, cpu_offload_params=False
        )[1]
    )


def measure_bf16_states(rank: int, world_size: int, zero: int) -> int:
    """Model-state bytes after one bf16 step (a short batch: bf16 matmuls crawl on this CPU)."""
    engine = make_engine(Plan(dp=world_size, zero=zero, precision="bf16"))
    tokens = torch.randint(0, REFERENCE.vocab_size, (1, 16))
    engine.train_step({"input_ids": tokens, "labels": tokens})
    return engine.state_bytes()["total"]


def second_opinion(world: int) -> list[dict[str, Any]]:
    """bf16 ZeRO-2/3 model states: measured, the planner's estimate, and DeepSpeed's estimators."""
    shape = ModelShape(REFERENCE, name="reference")
    cluster = Cluster.preset("h100", devices_per_node=world)  # model states need no calibration
    estimator = Estimator(shape, Workload(GLOBAL_BATCH, SEQ_LEN), cluster=cluster)
    largest = max(unit.local(1) for unit in shape.stage_units(0, num_layers=REFERENCE.num_layers, pp=1, tp=1))
    rows = []
    for zero in (2, 3):
        measured = max(run_ranks(measure_bf16_states, world, zero))
        plan = Plan(dp=world, zero=zero, precision="bf16")
        rows.append({
            "world": world, "zero": zero, "measured": measured,
            "planner": estimator.estimate(plan).memory.model_states,
            "deepspeed": deepspeed_states(zero, num_params=REFERENCE.num_parameters(), largest_layer=largest, dp=world),
        })  # fmt: skip
    return rows


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for position, index in enumerate(order):
            out[index] = float(position)
        return out

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 0.0 if n > 1 else 1.0


def step_seconds(results: list[dict[str, Any]]) -> list[float]:
    """Each timed step's seconds on the slowest rank."""
    return [max(r["seconds"][i] for r in results) for i in range(len(results[0]["seconds"]))]


def run_world(world: int, plans: list[dict[str, Any]], num_steps: int, rounds: int) -> dict[str, Any]:
    started = time.perf_counter()
    probe = Probe(tokens=GLOBAL_BATCH // world * SEQ_LEN, hidden=REFERENCE.d_model, seq_len=SEQ_LEN)
    cluster = calibrate(world, probe=probe, repeats=3)
    calibration_s = time.perf_counter() - started
    workload = Workload(GLOBAL_BATCH, SEQ_LEN)
    estimators = {
        name: Estimator(ModelShape(config, name=name), workload, cluster=cluster) for name, config in MODELS.items()
    }
    estimates = []
    for options in plans:  # every estimate before anything of the plan runs
        name, fields = split_options(options)
        estimates.append(estimators[name].estimate(Plan(**fields).resolve(world)))
    rows = []
    measured: dict[int, list[dict[str, Any]]] = {}
    seconds: dict[int, list[float]] = {index: [] for index in range(len(plans))}
    loads: dict[int, list[float | None]] = {index: [] for index in range(len(plans))}
    for round_index in range(rounds):  # rounds through all plans, so drift on a shared machine hits each alike
        for index, options in enumerate(plans):
            name, fields = split_options(options)
            plan = Plan(**fields).resolve(world)
            loads[index].append(load_average())  # a busy machine shows here (other users' jobs)
            results = run_ranks(measure_plan, world, plan, MODELS[name], num_steps, round_index == 0)
            measured.setdefault(index, results)
            seconds[index] += step_seconds(results)
    for index, options in enumerate(plans):
        est, name = estimates[index], split_options(options)[0]
        plan = est.plan
        results = measured[index]
        step_s = statistics.median(seconds[index])
        rows.append({
            "world": world, "model": name, "plan": describe(plan) + ("" if name == "reference" else f" {name}"),
            "options": options,
            "est_states": est.memory.model_states + (est.offload.host if est.offload else 0.0),
            "states": max(r["states"] for r in results), "states_detail": results[0]["states_detail"],
            # the host is the device here: host-held states are live tensors on it too
            "est_peak": est.memory.tensors + est.memory.host, "peak": max(r["live_peak"] for r in results),
            "est_step_s": est.step_s, "step_s": step_s,
            "step_spread": [min(seconds[index]), max(seconds[index])],
            "step_seconds": seconds[index], "load_1min_before_each_round": loads[index],
            "est_time": est.time.as_dict(), "est_memory": est.memory.as_dict(),
        })  # fmt: skip
        print(f"  measured {rows[-1]['plan']}: {step_s:.3f} s (est {est.step_s:.3f})", file=sys.stderr, flush=True)
    return {"cluster": dataclasses.asdict(cluster), "calibration_s": calibration_s, "rows": rows}


def summarize(worlds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    rows = [row for world in worlds.values() for row in world["rows"]]
    for row in rows:
        row["states_err"] = row["est_states"] / row["states"] - 1
        row["peak_err"] = row["est_peak"] / row["peak"] - 1
        row["step_err"] = row["est_step_s"] / row["step_s"] - 1
    summary: dict[str, Any] = {"num_plans": len(rows)}
    summary["max_abs_states_err"] = max(abs(r["states_err"]) for r in rows)
    summary["max_abs_peak_err"] = max(abs(r["peak_err"]) for r in rows)
    summary["median_abs_step_err"] = statistics.median(abs(r["step_err"]) for r in rows)
    summary["max_abs_step_err"] = max(abs(r["step_err"]) for r in rows)
    summary["plans_step_within_10pct"] = sum(abs(r["step_err"]) <= 0.10 for r in rows)
    for world, data in worlds.items():
        world_rows = data["rows"]
        est, measured = [r["est_step_s"] for r in world_rows], [r["step_s"] for r in world_rows]
        summary[f"spearman_world{world}"] = spearman(est, measured)
        for model in sorted({r["model"] for r in world_rows}):  # the planner picks among one model's plans
            model_rows = [r for r in world_rows if r["model"] == model]
            picked = min(model_rows, key=lambda r: r["est_step_s"])
            fastest = min(model_rows, key=lambda r: r["step_s"])
            summary[f"picked_world{world}_{model}"] = {
                "picked": picked["plan"], "picked_measured_s": picked["step_s"],
                "fastest": fastest["plan"], "fastest_measured_s": fastest["step_s"],
                "picked_over_fastest": picked["step_s"] / fastest["step_s"] - 1,
            }  # fmt: skip
    summary["spearman_all"] = spearman([r["est_step_s"] for r in rows], [r["step_s"] for r in rows])
    return summary


def print_report(worlds: dict[int, dict[str, Any]], summary: dict[str, Any]) -> None:
    headers = (
        "world",
        "plan",
        "states est",
        "meas",
        "err",
        "peak est",
        "meas",
        "err",
        "step est",
        "meas",
        "err",
    )
    table = []
    for data in worlds.values():
        for r in data["rows"]:
            table.append((
                r["world"], r["plan"], format_bytes(r["est_states"]), format_bytes(r["states"]),
                f"{100 * r['states_err']:+.2f}%", format_bytes(r["est_peak"]), format_bytes(r["peak"]),
                f"{100 * r['peak_err']:+.2f}%", f"{r['est_step_s']:.3f}", f"{r['step_s']:.3f}",
                f"{100 * r['step_err']:+.1f}%",
            ))  # fmt: skip
    print(format_table(headers, table))
    opinions = summary.get("second_opinion", [])
    if opinions:
        print("\nbf16 model states per rank: measured, planner, DeepSpeed's estimate_zero{2,3}_model_states_mem_needs")
        rows = [
            (o["world"], o["zero"], format_bytes(o["measured"]), format_bytes(o["planner"]),
             f"{100 * (o['planner'] / o['measured'] - 1):+.2f}%",
             format_bytes(o["deepspeed"]) if o["deepspeed"] else "not installed",
             f"{100 * (o['deepspeed'] / o['measured'] - 1):+.1f}%" if o["deepspeed"] else "-")
            for o in opinions
        ]  # fmt: skip
        print(format_table(("world", "zero", "measured", "planner", "err", "DeepSpeed", "err"), rows))
    for key, value in summary.items():
        if key == "second_opinion":
            continue
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two plans per world size, three steps")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per plan (the median is reported)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all plans (timed steps pool)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--only", type=int, nargs="+", help="indices into each world's plan list (development)")
    args = parser.parse_args(argv)
    steps = 3 if args.quick else args.steps
    worlds = {}
    for world in args.worlds:
        plans = PLANS[world][:2] if args.quick else PLANS[world]
        plans = [plans[i] for i in args.only if i < len(plans)] if args.only else plans
        print(f"world {world}: calibrating, then {len(plans)} plans", file=sys.stderr, flush=True)
        worlds[world] = run_world(world, plans, steps, 1 if args.quick else args.rounds)
    summary = summarize(worlds)
    summary["second_opinion"] = [row for world in args.worlds for row in second_opinion(world)]
    print_report(worlds, summary)
    name = "planner-quick.json" if args.quick or args.only else "planner.json"
    payload = {"environment": environment(), "model": dataclasses.asdict(REFERENCE), "global_batch": GLOBAL_BATCH}
    payload |= {"worlds": {str(k): v for k, v in worlds.items()}, "summary": summary}
    path = write_json(RESULTS_DIR / name, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
