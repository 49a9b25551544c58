"""Operator fusion: plait eager vs plait compiled vs the peers compiled the torchtitan way.

Both groups train the same GPT (`bench-dp`: d_model 512, 8 layers, vocab 8192, seq 128) from the
same initial weights on the same batches, AdamW, 2 ranks of 1 thread each over gloo:

- zero0: plait Plan(dp=2) eager | plait Plan(dp=2, compile="blocks") | torch DDP with each block
  torch.compile'd (torchtitan's per-block compile, before wrapping);
- zero3: plait Plan(dp=2, zero=3) eager | the same compiled | FSDP2 `fully_shard` per block
  (reshard_after_forward) over per-block torch.compile, then the root, as torchtitan applies them.

Each runs in fp32 and, on a CPU with bf16 matmul units (AMX / avx512_bf16), in bf16 (plait:
plan.precision="bf16"; FSDP2: MixedPrecisionPolicy(bf16 params, fp32 reduce); DDP: autocast bf16).
Within a group the three systems run in rounds whose order rotates (A B C, B C A, C A B, ...);
ratios are per round, quoted as the median with the spread. MFU (plait.train.metrics: 6N + 12 L d s
FLOPs per token) is against one thread's matmul rate in the same precision, measured at the model's
products' shapes (the fastest of q/k/v, out, MLP up/down, head) and, beside it, at 2048^3.
After the timed rounds rank 0 profiles `--region-steps` steps of each system: the JSON's `regions`
say where a step's time goes (ms by phase: compiled blocks forward/backward, eager head/loss,
gradient accumulation and reduction, optimizer, the step's tail; and by kind: matmul, attention,
casts, zeroing, ...; see profile_regions.py).

    python benchmarks/fusion.py            # the full run (~8-10 min on 2 cores, compilation included)
    python benchmarks/fusion.py --quick    # a tiny model and 3 rounds: a smoke check
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import (
    RESULTS_DIR,
    environment,
    format_table,
    load_average,
    ratio_summary,
    run_ranks,
    spread,
    timed_block,
    verdict,
    write_json,
)
from profile_regions import profile_steps

import plait
from plait.models import build
from plait.train.metrics import measure_peak, mfu, model_flops_per_token

WORLD_SIZE = 2
PRESET = "bench-dp"
GROUPS = {
    "zero0": ("plait-eager", "plait-compiled", "ddp-compiled"),
    "zero3": ("plait-eager", "plait-compiled", "fsdp2-compiled"),
}
TARGETS = {"compiled_over_eager": 1.1, "plait_over_peer": 1.1, "mfu_share_of_peak_fp32_dp2": 0.8}


@dataclass(frozen=True)
class BenchConfig:
    rounds: int = 5
    steps: int = 3  # timed steps per block
    batch: int = 4  # sequences per rank per step
    seq: int = 128
    d_model: int | None = None
    layers: int | None = None
    precisions: tuple[str, ...] = ("fp32", "bf16")
    groups: tuple[str, ...] = ("zero0", "zero3")
    quick: bool = False
    region_steps: int = 2  # profiled steps per system after the timed rounds (rank 0): where the time goes

    def model_overrides(self) -> dict[str, int]:
        fields = {"d_model": self.d_model, "num_layers": self.layers}
        return {"max_seq_len": self.seq, **{k: v for k, v in fields.items() if v is not None}}


def has_bf16_units() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def optimizer(params):
    # fused, as plait train builds it: the unfused per-tensor loop was a third of an eager step here
    return torch.optim.AdamW(params, lr=3e-4, eps=1e-8, fused=True)


class PlaitSystem:
    def __init__(self, model: torch.nn.Module, *, zero: int, precision: str, compiled: bool) -> None:
        plan = plait.Plan(dp=WORLD_SIZE, zero=zero, precision=precision, compile="blocks" if compiled else "off")
        self.engine = plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.engine.train_step(batch).loss


class PeerSystem:
    """torch DDP or FSDP2 over per-block torch.compile, the torchtitan order (compile, then wrap)."""

    def __init__(self, model: torch.nn.Module, *, zero: int, precision: str) -> None:
        for index, block in enumerate(model.blocks):
            model.blocks[index] = torch.compile(block)
        self.autocast = precision == "bf16" and zero == 0
        if zero == 0:
            self.model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32
            )
            for block in model.blocks:
                fully_shard(block, reshard_after_forward=True, mp_policy=policy)
            self.model = fully_shard(model, reshard_after_forward=True, mp_policy=policy)
        self.optimizer = optimizer(model.parameters())

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss_sum, num_tokens = plait.losses.causal_lm(self.model(**batch), batch)
        num_tokens = num_tokens.clone().float()
        dist.all_reduce(num_tokens)  # the global token count, as plait divides by
        loss = loss_sum.float() * WORLD_SIZE / num_tokens
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


def make_system(name: str, model: torch.nn.Module, *, group: str, precision: str) -> Any:
    zero = 0 if group == "zero0" else 3
    if name.startswith("plait"):
        return PlaitSystem(model, zero=zero, precision=precision, compiled=name == "plait-compiled")
    return PeerSystem(model, zero=zero, precision=precision)


def model_shape_peak(config: BenchConfig, *, vocab: int, d_model: int, dtype: torch.dtype) -> dict[str, Any]:
    """One thread's matmul rate at each of the model's products (tokens t = batch x seq): q/k/v
    (t x d x 3d), attention out (t x d x d), MLP up (t x d x 4d) and down (t x 4d x d), head
    (t x d x V); rate = 2 m k n / seconds, best of 3. The peak is the fastest of them."""
    t = config.batch * config.seq
    shapes = {"qkv": (t, d_model, 3 * d_model), "attn_out": (t, d_model, d_model), "mlp_up": (t, d_model, 4 * d_model)}
    shapes |= {"mlp_down": (t, 4 * d_model, d_model), "head": (t, d_model, vocab)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        rates[name] = 2 * m * k * n / min(timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(3))
    return {"flops": max(rates.values()), "by_shape": rates, "shapes": shapes}


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_group(rank: int, config: BenchConfig, *, group: str, precision: str) -> dict[str, Any]:
    names = GROUPS[group]
    torch.manual_seed(0)
    base = build(PRESET, **config.model_overrides())
    gen = torch.Generator().manual_seed(17 + rank)
    batches = [torch.randint(0, base.config.vocab_size, (config.batch, config.seq), generator=gen) for _ in range(4)]
    batches = [{"input_ids": t, "labels": t} for t in batches]
    systems = {name: make_system(name, copy.deepcopy(base), group=group, precision=precision) for name in names}
    first_step_s = {}
    for name, system in systems.items():  # the first step compiles: timed apart
        first_step_s[name], _ = timed_block(lambda system=system: system.step(batches[0]).item())
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu_s: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, float] = {}
    orders = []
    for round_index in range(config.rounds):
        order = list(names[round_index % 3 :] + names[: round_index % 3])
        orders.append(order)
        for name in order:
            systems[name].step(batches[1])  # untimed: re-fault memory the other systems used
            cpu_start = time.thread_time()
            block_s, loss = timed_block(
                lambda name=name: [systems[name].step(b) for b in batches[: config.steps]][-1].item()
            )
            cpu_s[name].append(time.thread_time() - cpu_start)  # main thread on a CPU: ignores waits and load
            seconds[name].append(block_s)
            losses[name] = loss
    stats = {
        name: system.engine.compile_stats.line(system.engine.compiled.describe())
        for name, system in systems.items()
        if isinstance(system, PlaitSystem) and system.engine.compiled is not None
    }
    regions = region_breakdown(systems, batches[2], rank=rank, steps=config.region_steps) if config.region_steps else {}
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "orders": orders,
        "first_step_s": first_step_s,
        "last_loss": losses,
        "compile": stats,
        "regions": regions,
    }


def key_of(group: str, precision: str) -> str:
    return f"{group}-{precision}"


def region_breakdown(systems: dict[str, Any], batch: dict[str, torch.Tensor], *, rank: int, steps: int) -> dict:
    """Where each system's step goes (profile_regions: ms per step by phase and by kind, rank 0's main thread)."""
    out = {}
    for name, system in systems.items():
        table = profile_steps(lambda system=system: system.step(batch).item(), rank=rank, steps=steps)
        keep = ("wall_ms", "cpu_ms", "unprofiled_wall_ms", "by_phase", "by_kind", "by_phase_kind", "top_ops")
        out[name] = {k: table[k] for k in keep if k in table}
    return out


def rank_main(rank: int, world_size: int, config: BenchConfig) -> dict[str, Any]:
    model = build(PRESET, **config.model_overrides())
    shapes = {"vocab": model.config.vocab_size, "d_model": model.config.d_model}
    result: dict[str, Any] = {
        "num_params": sum(p.numel() for p in model.parameters()),
        "model_config": asdict(model.config),
    }
    result["peaks"] = {}
    for precision in config.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        dist.barrier()  # both ranks measure together, one thread each, as they train
        result["peaks"][precision] = {
            "model_shape": model_shape_peak(config, dtype=dtype, **shapes),
            "square_2048": measure_peak(torch.device("cpu"), dtype=dtype).flops,
        }
    result["runs"] = {}
    for precision in config.precisions:
        for group in config.groups:
            result["runs"][key_of(group, precision)] = {
                "load_before": load_average(),
                **run_group(rank, config, group=group, precision=precision),
            }
    return result


def summarize(results: list[dict[str, Any]], config: BenchConfig) -> dict[str, Any]:
    lead = results[0]
    cfg = lead["model_config"]
    per_token = model_flops_per_token(
        num_params=lead["num_params"], num_layers=cfg["num_layers"], d_model=cfg["d_model"], seq_len=config.seq
    )
    tokens = WORLD_SIZE * config.batch * config.seq * config.steps
    summary: dict[str, Any] = {"flops_per_token": per_token, "runs": {}}
    for key, run in lead["runs"].items():
        group, precision = key.split("-")
        # the measured peak is the best rank's: a rank whose product shared its core with other work measures low
        peak = max(r["peaks"][precision]["model_shape"]["flops"] for r in results)
        rates = {name: [tokens / s for s in seconds] for name, seconds in run["seconds"].items()}
        peer = GROUPS[group][2]
        entry = {
            "tokens_per_s": {name: spread(values) for name, values in rates.items()},
            "mfu_vs_model_shape_peak": {
                name: mfu(
                    tokens_per_s=statistics.median(values),
                    flops_per_token=per_token,
                    peak_flops=peak,
                    num_ranks=WORLD_SIZE,
                )
                for name, values in rates.items()
            },
            "compiled_over_eager": ratio_summary(rates["plait-compiled"], rates["plait-eager"]),
            "plait_compiled_over_peer": ratio_summary(rates["plait-compiled"], rates[peer]),
            # on a shared box: model FLOPs of rank 0's block / (its main thread's CPU seconds x peak)
            "mfu_on_cpu_time": {
                name: per_token * tokens / WORLD_SIZE / (statistics.median(run["cpu_s"][name]) * peak) for name in rates
            },
            # cross-check robust to a shared box: per-round ratio of main-thread CPU seconds (rank 0)
            "cpu_work_eager_over_compiled": ratio_summary(run["cpu_s"]["plait-eager"], run["cpu_s"]["plait-compiled"]),
            "cpu_work_peer_over_plait_compiled": ratio_summary(run["cpu_s"][peer], run["cpu_s"]["plait-compiled"]),
            "cpu_share": {name: sum(run["cpu_s"][name]) / sum(run["seconds"][name]) for name in rates},
            "first_step_s": run["first_step_s"],
            "last_loss": run["last_loss"],
            "compile_log": run["compile"],
            "mfu_vs_square_2048_peak": {
                name: mfu(
                    tokens_per_s=statistics.median(values),
                    flops_per_token=per_token,
                    peak_flops=max(r["peaks"][precision]["square_2048"] for r in results),
                    num_ranks=WORLD_SIZE,
                )
                for name, values in rates.items()
            },
            "load_before": run["load_before"],
            # ms per step on rank 0 by phase and by kind (profile_regions), profiled after the timed rounds
            "regions": {
                name: {k: table[k] for k in ("wall_ms", "cpu_ms", "by_phase", "by_kind") if k in table}
                for name, table in run.get("regions", {}).items()
            },
        }
        summary["runs"][key] = entry
    return summary


def print_report(summary: dict[str, Any], results: list[dict[str, Any]], config: BenchConfig) -> None:
    lead = results[0]
    cfg = lead["model_config"]
    print(
        f"\nfusion | {PRESET}: d_model {cfg['d_model']}, {cfg['num_layers']} layers, vocab {cfg['vocab_size']}, "
        f"seq {config.seq}, P = {lead['num_params']:,} | {WORLD_SIZE} ranks x 1 thread, batch {config.batch}/rank | "
        f"{config.rounds} rounds x {config.steps} steps"
    )
    for precision, peaks in lead["peaks"].items():
        shape = peaks["model_shape"]
        best = max(shape["by_shape"], key=shape["by_shape"].get)
        print(
            f"peak {precision}: {shape['flops'] / 1e9:.1f} GFLOP/s at the model's {best} product "
            f"{list(shape['shapes'][best])}, {peaks['square_2048'] / 1e9:.1f} at 2048^3 (rank 0, one thread)"
        )
    rows = []
    for key, run in summary["runs"].items():
        for name, rate in run["tokens_per_s"].items():
            rows.append(
                [
                    key,
                    name,
                    f"{rate['median']:.0f}",
                    f"{rate['min']:.0f}-{rate['max']:.0f}",
                    f"{100 * run['mfu_vs_model_shape_peak'][name]:.1f}%",
                    f"{run['first_step_s'][name]:.1f}",
                ]
            )
    print(format_table(["run", "system", "tokens/s", "min-max", "MFU", "first step s"], rows))
    print()
    for key, run in summary["runs"].items():
        for label, ratio in (
            ("compiled/eager", run["compiled_over_eager"]),
            ("plait compiled/peer compiled", run["plait_compiled_over_peer"]),
        ):
            print(
                f"{key} {label}: median {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}) target >= 1.1: {verdict(ratio['median'], 1.1)}"
            )
        on_cpu = " ".join(f"{name} {100 * value:.1f}%" for name, value in run["mfu_on_cpu_time"].items())
        print(f"  MFU on CPU time (rank 0's FLOPs / main-thread CPU s / peak): {on_cpu}")
        cpu = run["cpu_work_eager_over_compiled"]["median"], run["cpu_work_peer_over_plait_compiled"]["median"]
        shares = " ".join(f"{name} {share:.2f}" for name, share in run["cpu_share"].items())
        print(
            f"  CPU work (rank 0 main thread) eager/compiled {cpu[0]:.3f}, peer/plait compiled {cpu[1]:.3f}; cpu share {shares}"
        )
        for line in run["compile_log"].values():
            print(f"  {line}")
        for name, table in run["regions"].items():
            phases = sorted(table["by_phase"].items(), key=lambda kv: -kv[1])[:6]
            where = ", ".join(f"{phase} {ms:.0f}" for phase, ms in phases)
            print(
                f"  {name} ms/step (rank 0, profiled): wall {table['wall_ms']:.0f}, CPU {table['cpu_ms']:.0f}: {where}"
            )


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the three systems (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (default 3)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None)
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=None)
    parser.add_argument("--quick", action="store_true", help="a tiny model, 3 rounds: a smoke check")
    parser.add_argument(
        "--region-steps", type=int, default=2, help="profiled steps per system for the breakdown by region (0: none)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/fusion.json)")
    args = parser.parse_args(argv)
    base: dict[str, Any] = {"d_model": 128, "layers": 2, "seq": 64, "rounds": 3, "steps": 2} if args.quick else {}
    precisions = tuple(args.precisions or (("fp32", "bf16") if has_bf16_units() else ("fp32",)))
    chosen = {k: getattr(args, k) for k in ("rounds", "steps") if getattr(args, k) is not None}
    config = BenchConfig(
        **{**base, **chosen},
        precisions=precisions,
        groups=tuple(args.groups or GROUPS),
        quick=args.quick,
        region_steps=args.region_steps,
    )
    return config, args.out or RESULTS_DIR / ("fusion-quick.json" if config.quick else "fusion.json")


def main(argv: list[str] | None = None) -> int:
    config, out_path = parse_args(argv)
    started = time.perf_counter()
    load_start = load_average()
    results = run_ranks(rank_main, WORLD_SIZE, config, num_threads=1, timeout_s=1500)
    summary = summarize(results, config)
    print_report(summary, results, config)
    payload = {
        "benchmark": "fusion",
        "config": {**asdict(config), "preset": PRESET, "world_size": WORLD_SIZE, "threads_per_rank": 1},
        "targets": TARGETS,
        "environment": environment(),
        "load_average": {"start": load_start, "end": load_average()},
        "wall_s": time.perf_counter() - started,
        "summary": summary,
        "per_rank": results,
    }
    print(f"\nwrote {write_json(out_path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
