"""Expert parallel on moe-100m (8 SwiGLU experts, top-2, dropless): tokens/s at ep = 1, 2, 4 on one
world, the share of a step spent in all-to-alls, model states and peak RSS per rank; and DeepSpeed-MoE
on the same model and batches where DeepSpeed is installed (benchmarks/moe_deepspeed.py).

World 4 on this 2-core box is oversubscribed (4 ranks of one thread each on 2 cores): every
configuration runs on the same world, so the comparison holds, but absolute tokens/s are a
quarter-core's. Each configuration is a fresh forked world (three 103M-parameter models do not fit
in one process's memory at once); the configurations run in rounds whose order alternates (ep1 ep2
ep4 ds ..., then reversed), and the load average is recorded with every run, since the box is
shared. The all-to-all share is torch.profiler's time inside c10d all_to_all over one extra step on
rank 0. Model states are counted from live tensors after the first step, next to the planner's
estimate. A plan plait refuses is recorded with plait's message, never a figure.

    python benchmarks/moe.py                 # world 4, ep 1 2 4 + DeepSpeed, 2 rounds (~5 min)
    python benchmarks/moe.py --quick         # a 2-layer d_model 128 model, 1 round (~40 s)
    python benchmarks/moe.py --ep 1 --systems plait   # one configuration

Writes benchmarks/results/moe.json (moe-quick.json) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import (
    RESULTS_DIR,
    environment,
    format_bytes,
    format_table,
    load_average,
    model_state_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    run_ranks,
    timed_block,
    write_json,
)

PRESET = "moe-100m"


@dataclass(frozen=True)
class Spec:
    system: str  # "plait" or "deepspeed"
    ep: int
    world: int = 4
    batch: int = 2  # sequences per rank per step
    seq: int = 256
    steps: int = 3  # timed steps
    warmup: int = 1
    lr: float = 3e-4
    overrides: tuple[tuple[str, int], ...] = ()  # model fields (--quick)


def make_batches(spec: Spec, *, vocab: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, vocab, (spec.batch, spec.seq), generator=gen) for _ in range(spec.warmup + spec.steps + 1)]


def plait_system(spec: Spec) -> tuple[Any, Any, Any]:
    import plait
    from plait.models import build

    torch.manual_seed(0)
    model = build(PRESET, max_seq_len=spec.seq, **dict(spec.overrides))
    engine = plait.boost(
        model, optimizer=lambda ps: torch.optim.AdamW(ps, lr=spec.lr), loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=spec.world, ep=spec.ep), max_grad_norm=1.0,
    )  # fmt: skip

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return engine.train_step({"input_ids": tokens, "labels": tokens}).loss

    return model, engine.optimizer, step


def all_to_all_seconds(step: Any, tokens: torch.Tensor) -> dict[str, float]:
    """One step under torch.profiler: its wall seconds and the seconds inside c10d's all-to-all."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        step(tokens)
        wall = time.perf_counter() - started
    inside = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "c10d::alltoall_base_") / 1e6
    return {"step_s": wall, "all_to_all_s": inside}


def build(spec: Spec, rank: int) -> tuple[Any, Any, Any]:
    if spec.system == "plait":
        return plait_system(spec)
    from moe_deepspeed import deepspeed_system

    engine, step = deepspeed_system(
        PRESET, seq=spec.seq, ep=spec.ep, rank=rank, world_size=spec.world, micro_batch=spec.batch, lr=spec.lr,
        overrides=dict(spec.overrides),
    )  # fmt: skip
    return engine.module, engine.optimizer, step


def rank_main(rank: int, world_size: int, spec: Spec) -> dict[str, Any]:
    try:
        model, optimizer, step = build(spec, rank)
    except (ValueError, ImportError) as error:  # a plan plait refuses, or no DeepSpeed here
        return {"refused": f"{type(error).__name__}: {error}"}
    batches = make_batches(spec, vocab=model.config.vocab_size, rank=rank)
    losses = [float(step(batches[0]))]
    states = model_state_bytes(model, optimizer)
    for tokens in batches[1 : spec.warmup]:
        losses.append(float(step(tokens)))
    reset_peak_rss()
    seconds = []
    for tokens in batches[spec.warmup : spec.warmup + spec.steps]:
        elapsed, loss = timed_block(lambda t=tokens: step(t))
        seconds.append(elapsed)
        losses.append(float(loss))
    peak = peak_rss_bytes()
    # every rank runs the profiled step (its collectives need all of them); rank 0 records it
    profiled = None
    if rank == 0:
        profiled = all_to_all_seconds(step, batches[-1])
    else:
        step(batches[-1])
    dist.barrier()
    return {"seconds": seconds, "losses": losses, "model_states": states, "peak_rss": peak, "profile": profiled,
            "num_local_params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def planner_states(spec: Spec) -> float:
    """The planner's model-state bytes per rank for this plan (plait's plans only)."""
    from plait.config import Plan
    from plait.models.presets import get_preset
    from plait.planner import ModelShape
    from plait.planner.memory import unit_state_bytes

    config = replace(get_preset(PRESET), max_seq_len=spec.seq, **dict(spec.overrides))
    shape = ModelShape(config)
    units = shape.stage_units(0, num_layers=config.num_layers, pp=1, tp=1, ep=spec.ep)
    states = unit_state_bytes(units, Plan(dp=spec.world, ep=spec.ep))
    return states.params + states.master + states.grads + states.optimizer


def run_one(spec: Spec) -> dict[str, Any]:
    load = load_average()
    started = time.perf_counter()
    results = run_ranks(rank_main, spec.world, spec, timeout_s=1200.0)
    record: dict[str, Any] = {"spec": asdict(spec), "load_before": load, "load_after": load_average(),
                              "wall_s": time.perf_counter() - started}  # fmt: skip
    if "refused" in results[0]:
        print(f"  {spec.system} ep={spec.ep}: refused: {results[0]['refused']}", flush=True)
        return record | {"refused": results[0]["refused"]}
    step_s = [max(r["seconds"][i] for r in results) for i in range(spec.steps)]
    tokens = spec.world * spec.batch * spec.seq
    profile = results[0]["profile"]
    record |= {
        "step_s": step_s, "tokens_per_s": tokens / statistics.median(step_s),
        "all_to_all_share": profile["all_to_all_s"] / profile["step_s"], "profile_rank0": profile,
        "model_states_per_rank": [r["model_states"]["total"] for r in results],
        "peak_rss_per_rank": [r["peak_rss"] for r in results], "losses_rank0": results[0]["losses"],
        "local_params_per_rank": [r["num_local_params"] for r in results],
    }  # fmt: skip
    if spec.system == "plait":
        record["planner_model_states"] = planner_states(spec)
    print(f"  {spec.system} ep={spec.ep}: {record['tokens_per_s']:,.0f} tokens/s, all-to-all "
          f"{100 * record['all_to_all_share']:.1f}%, load {load}", flush=True)  # fmt: skip
    return record


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: medians over its rounds."""
    rows = []
    for key in dict.fromkeys((r["spec"]["system"], r["spec"]["ep"]) for r in runs):
        mine = [r for r in runs if (r["spec"]["system"], r["spec"]["ep"]) == key]
        ok = [r for r in mine if "refused" not in r]
        row: dict[str, Any] = {"system": key[0], "ep": key[1], "rounds": len(ok)}
        if not ok:
            rows.append(row | {"refused": mine[0]["refused"]})
            continue
        row |= {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in ok],
            "all_to_all_share": statistics.median(r["all_to_all_share"] for r in ok),
            "model_states_per_rank": max(ok[0]["model_states_per_rank"]),
            "planner_model_states": ok[0].get("planner_model_states"),
            "peak_rss_per_rank": max(max(r["peak_rss_per_rank"]) for r in ok),
            "load_average": [r["load_before"] for r in ok],
        }  # fmt: skip
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = []
    for row in rows:
        if "refused" in row:
            cells.append([f"{row['system']} ep{row['ep']}", "refused", "", "", "", "", row["refused"][:60]])
            continue
        planned = row["planner_model_states"]
        cells.append([
            f"{row['system']} ep{row['ep']}", f"{row['tokens_per_s']:,.0f}", f"{100 * row['all_to_all_share']:.1f}%",
            format_bytes(row["model_states_per_rank"]), format_bytes(planned) if planned else "-",
            format_bytes(row["peak_rss_per_rank"]), " ".join(f"{x:.1f}" for x in row["load_average"]),
        ])  # fmt: skip
    headers = ["system", "tokens/s", "all-to-all", "states/rank", "planner", "peak RSS/rank", "load avg"]
    print(format_table(headers, cells))


def plot(rows: list[dict[str, Any]], path: Any, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "refused" not in r]
    labels = [f"{'DS' if r['system'] == 'deepspeed' else r['system']}\nep{r['ep']}" for r in done]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(labels, [r["tokens_per_s"] for r in done])
    axes[0].set_title("tokens/s (median over rounds; DS: DeepSpeed-MoE)")
    axes[1].bar(labels, [100 * r["all_to_all_share"] for r in done])
    axes[1].set_title("all-to-all share of a step (%)")
    axes[2].bar(labels, [r["model_states_per_rank"] / 2**30 for r in done], label="model states")
    axes[2].bar(labels, [(r["peak_rss_per_rank"] - r["model_states_per_rank"]) / 2**30 for r in done],
                bottom=[r["model_states_per_rank"] / 2**30 for r in done], label="rest of peak RSS")  # fmt: skip
    axes[2].set_title("GiB per rank")
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--systems", nargs="+", default=["plait", "deepspeed"], choices=["plait", "deepspeed"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/moe.json, moe-quick.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = (("d_model", 128), ("num_layers", 2), ("moe_d_ff", 256)) if args.quick else ()
    specs = [Spec(system, ep, world=args.world, steps=args.steps, overrides=overrides)
             for system in args.systems for ep in args.ep]  # fmt: skip
    name = "moe-quick" if args.quick else "moe"
    json_path = args.out or RESULTS_DIR / f"{name}.json"
    runs = []
    for round_index in range(1 if args.quick else args.rounds):
        for spec in specs if round_index % 2 == 0 else specs[::-1]:
            runs.append(run_one(spec))
            # every finished run is kept, so a run cut short (a time limit on a shared box) loses no figure
            partial = {"preset": PRESET, "world": args.world, "complete": False, "runs": runs}
            write_json(json_path, partial | {"environment": environment()})
    rows = summarize(runs)
    print_table(rows)
    title = f"{PRESET}{' (quick)' if args.quick else ''}: world {args.world} on {environment()['cpu_count']} cores"
    plot(rows, json_path.with_suffix(".png"), title=title)
    payload = {"preset": PRESET, "world": args.world, "complete": True, "rows": rows, "runs": runs,
               "environment": environment()}  # fmt: skip
    print(f"wrote {write_json(json_path, payload)} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
