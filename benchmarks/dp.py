"""plait data parallel against torch DDP on the same work, alternating A B A B.

Both systems train the same GPT (`bench-dp`: d_model 512, 8 layers, vocab
8192, seq 128, GPT-2 options) from the same initial weights on the same
batches, fp32 AdamW, 2 ranks of 1 thread each over gloo. Each rank builds
both once, then for every pair times a block of steps of each system (after
one untimed step of that system), the first system alternating between
pairs. Reported: median tokens/s per system, the median per-pair ratio
plait/DDP with its spread, model-state bytes per rank, the process's peak
RSS, and plait's comm bytes per step next to theory. The box is shared, so
each block also records the share of its wall time the ranks' main threads
were on a CPU; the ratio over the quiet pairs and the ratio of CPU work are
printed as cross-checks next to the figure.

    python benchmarks/dp.py                  # the full run (~1.5-2.5 min on 2 cores)
    python benchmarks/dp.py --quick          # a tiny model, a smoke check (~10 s)
    python benchmarks/dp.py --profile        # also torch.profiler tables of 2 steps each (rank 0)
"""

from __future__ import annotations

import argparse
import copy
import os
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
    current_rss_bytes,
    environment,
    format_bytes,
    format_table,
    model_state_bytes,
    peak_rss_bytes,
    ratio_summary,
    reset_peak_rss,
    run_alternating,
    run_ranks,
    spread,
    timed_block,
    verdict,
    write_json,
)
from torch.nn.parallel import DistributedDataParallel

import plait
from plait.models import build

TARGET_RATIO = 0.97
# A block whose ranks' main threads were on a CPU for less of its wall time than this shared the box.
QUIET_CPU_SHARE = 0.85
WORLD_SIZE = 2
PRESET = "bench-dp"
SYSTEMS = ("plait", "ddp")


@dataclass(frozen=True)
class BenchConfig:
    pairs: int = 6
    steps: int = 4  # timed steps per block
    warmup: int = 1  # untimed steps per system before the first block
    block_warmup: int = 1  # untimed steps of a system right before each of its blocks
    batch: int = 4  # sequences per rank per step
    seq: int = 128
    d_model: int | None = None  # None: the preset's
    layers: int | None = None
    heads: int | None = None
    vocab: int | None = None
    lr: float = 3e-4
    eps: float = 1e-8
    seed: int = 0
    profile: bool = False
    quick: bool = False

    def model_overrides(self) -> dict[str, int]:
        fields = {"d_model": self.d_model, "num_layers": self.layers, "num_heads": self.heads, "vocab_size": self.vocab}
        return {"max_seq_len": self.seq, **{k: v for k, v in fields.items() if v is not None}}

    def tokens_per_step(self) -> int:
        return WORLD_SIZE * self.batch * self.seq


def make_optimizer(config: BenchConfig):
    def optimizer(params):
        return torch.optim.AdamW(params, lr=config.lr, eps=config.eps)

    return optimizer


def make_batches(config: BenchConfig, *, vocab_size: int, rank: int, num_batches: int) -> list[torch.Tensor]:
    """This rank's distinct token batches (batch, seq); both systems walk the same list."""
    gen = torch.Generator().manual_seed(config.seed * 1000 + 17 + rank)
    return [torch.randint(0, vocab_size, (config.batch, config.seq), generator=gen) for _ in range(num_batches)]


class PlaitSystem:
    def __init__(self, model: torch.nn.Module, config: BenchConfig) -> None:
        self.model = model
        self.engine = plait.boost(
            model,
            optimizer=make_optimizer(config),
            loss_fn=plait.losses.causal_lm,
            plan=plait.Plan(dp=WORLD_SIZE),
        )
        self.optimizer = self.engine.optimizer

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.engine.train_step({"input_ids": tokens, "labels": tokens}).loss


class DDPSystem:
    def __init__(self, model: torch.nn.Module, config: BenchConfig) -> None:
        self.model = model
        self.ddp = DistributedDataParallel(model)
        self.optimizer = make_optimizer(config)(model.parameters())
        self.before_zero_grad = None  # a callback, to count grads while they are alive

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": tokens, "labels": tokens}
        loss_sum, num_tokens = plait.losses.causal_lm(self.ddp(**batch), batch)
        loss = loss_sum / num_tokens
        loss.backward()
        self.optimizer.step()
        if self.before_zero_grad is not None:
            self.before_zero_grad()
        self.optimizer.zero_grad()
        return loss.detach()


class Runner:
    """One system's step counter over the shared batch list, with per-block records."""

    def __init__(self, name: str, system: Any, batches: list[torch.Tensor], config: BenchConfig) -> None:
        self.name = name
        self.system = system
        self.batches = batches
        self.config = config
        self.step_index = 0
        self.block_losses: list[float] = []  # global mean loss of each block's last step
        self.comm_bytes_per_step: list[float] = []
        # Noise diagnostics: the 1-minute load average when the block starts, and the share of
        # the block's wall time this rank's main thread got on a CPU (low when the box is shared).
        self.load_at_start: list[float] = []
        self.cpu_share: list[float] = []
        # VmHWM over each block (reset at its start), and its rise over the RSS at the start:
        # the block's transient memory (activations, gradients allocated per step).
        self.peak_rss: list[int] = []
        self.peak_rss_growth: list[int] = []

    def run_steps(self, num_steps: int) -> torch.Tensor:
        loss = torch.zeros(())
        for _ in range(num_steps):
            loss = self.system.step(self.batches[self.step_index % len(self.batches)])
            self.step_index += 1
        return loss

    def block(self) -> float:
        # The first step after the other system ran pays for re-faulting memory the allocator gave
        # back (DDP keeps its .grad tensors until zero_grad, so its heap peak is higher): untimed.
        self.run_steps(self.config.block_warmup)
        comm = getattr(getattr(self.system, "engine", None), "comm", None)
        if comm is not None:
            comm.reset()
        self.load_at_start.append(os.getloadavg()[0])
        reset_peak_rss()
        rss_start = current_rss_bytes() or 0
        cpu_start = time.thread_time()
        seconds, loss = timed_block(lambda: self.run_steps(self.config.steps))
        self.cpu_share.append((time.thread_time() - cpu_start) / seconds)
        peak = peak_rss_bytes() or 0
        self.peak_rss.append(peak)
        self.peak_rss_growth.append(peak - rss_start)
        if comm is not None:
            self.comm_bytes_per_step.append(comm.total_bytes / self.config.steps)
        self.block_losses.append(global_mean(loss))
        return seconds


def global_mean(value: torch.Tensor) -> float:
    value = value.detach().clone().float()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def build_systems(config: BenchConfig) -> tuple[dict[str, Any], dict[str, int | None]]:
    torch.manual_seed(config.seed)
    rss = {"start": current_rss_bytes()}
    model = build(PRESET, **config.model_overrides())
    reference = copy.deepcopy(model)  # the same initial weights for both
    rss["models_built"] = current_rss_bytes()
    systems = {"plait": PlaitSystem(model, config)}
    rss["plait_built"] = current_rss_bytes()
    systems["ddp"] = DDPSystem(reference, config)
    rss["ddp_built"] = current_rss_bytes()
    return systems, rss


def warm_up(runners: dict[str, Runner], config: BenchConfig) -> dict[str, Any]:
    """Untimed steps of each system; count model states after the first optimizer step."""
    states: dict[str, Any] = {}
    ddp = runners["ddp"].system

    def count_ddp() -> None:
        states["ddp"] = model_state_bytes(ddp.model, ddp.optimizer)
        ddp.before_zero_grad = None

    ddp.before_zero_grad = count_ddp
    first_losses = {}
    for name, runner in runners.items():
        first_losses[name] = global_mean(runner.run_steps(config.warmup))
    states["ddp_reducer"] = ddp_reducer_buffers(ddp.ddp)
    plait_system = runners["plait"].system
    states["plait"] = model_state_bytes(plait_system.model, plait_system.optimizer)
    for runner in runners.values():
        runner.step_index = 0  # both replay the same batches from here on
    return {"model_state_bytes": states, "warmup_loss": first_losses}


def ddp_reducer_buffers(ddp: DistributedDataParallel) -> dict[str, Any]:
    """DDP's flat bucket bytes: held besides the .grad tensors unless gradient_as_bucket_view."""
    data = ddp._get_ddp_logging_data()  # torch's own logging record; no public accessor exists
    sizes = [int(size) for size in str(data.get("bucket_sizes", "")).split(",") if size.strip()]
    return {
        "bucket_bytes": sum(sizes),
        "gradient_as_bucket_view": bool(data.get("gradient_as_bucket_view")),
    }


def profile_steps(runners: dict[str, Runner], *, rank: int, num_steps: int = 2) -> dict[str, str]:
    """torch.profiler tables of `num_steps` steps per system on rank 0 (every rank runs the steps)."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, runner in runners.items():
        dist.barrier()
        if rank == 0:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                runner.run_steps(num_steps)
            tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        else:
            runner.run_steps(num_steps)
        dist.barrier()
    return tables


def rank_main(rank: int, world_size: int, config: BenchConfig) -> dict[str, Any]:
    systems, rss = build_systems(config)
    model = systems["plait"].model
    num_params = sum(p.numel() for p in model.parameters())
    batches = make_batches(config, vocab_size=model.config.vocab_size, rank=rank, num_batches=8)
    runners = {name: Runner(name, systems[name], batches, config) for name in SYSTEMS}
    warm = warm_up(runners, config)
    peak_reset = reset_peak_rss()  # and again at every block's start
    rss["timed_start"] = current_rss_bytes()
    started = time.perf_counter()
    timing = run_alternating({name: runners[name].block for name in SYSTEMS}, num_pairs=config.pairs)
    wall_s = time.perf_counter() - started
    result = {
        "rank": rank,
        "num_params": num_params,
        "model_config": asdict(model.config),
        "timing": timing,
        "timed_wall_s": wall_s,
        "block_losses": {name: runners[name].block_losses for name in SYSTEMS},
        "comm_bytes_per_step": runners["plait"].comm_bytes_per_step,
        "load_at_block_start": {name: runners[name].load_at_start for name in SYSTEMS},
        "cpu_share": {name: runners[name].cpu_share for name in SYSTEMS},
        "comm_bytes_by_kind_last_block": dict(systems["plait"].engine.comm.bytes_by_kind),
        "peak_rss_bytes": max(max(runners[name].peak_rss) for name in SYSTEMS),
        "peak_rss_reset": peak_reset,
        "peak_rss_bytes_by_system": {name: max(runners[name].peak_rss) for name in SYSTEMS},
        "peak_rss_growth_bytes_by_system": {name: max(runners[name].peak_rss_growth) for name in SYSTEMS},
        "rss_bytes": rss,
        **warm,
    }
    if config.profile:
        result["profile"] = profile_steps(runners, rank=rank)
    return result


def cpu_seconds(results: list[dict[str, Any]], name: str) -> list[float]:
    """Main-thread CPU seconds of each of `name`'s blocks, summed over ranks."""
    per_rank = [
        [share * seconds for share, seconds in zip(r["cpu_share"][name], r["timing"]["seconds"][name], strict=True)]
        for r in results
    ]
    return [sum(block) for block in zip(*per_rank, strict=True)]


def quiet_pairs_ratio(results: list[dict[str, Any]], rates: dict[str, list[float]]) -> dict[str, Any]:
    """The ratio over the pairs where every rank's main thread had the CPU for both blocks."""
    shares = zip(*(zip(*(r["cpu_share"][name] for name in SYSTEMS), strict=True) for r in results), strict=True)
    quiet = [pair for pair, pair_shares in enumerate(shares) if min(min(s) for s in pair_shares) >= QUIET_CPU_SHARE]
    summary: dict[str, Any] = {"pairs": quiet, "min_cpu_share": QUIET_CPU_SHARE}
    if quiet:
        summary.update(ratio_summary([rates["plait"][p] for p in quiet], [rates["ddp"][p] for p in quiet]))
    return summary


def summarize(results: list[dict[str, Any]], config: BenchConfig) -> dict[str, Any]:
    lead = results[0]
    tokens = config.tokens_per_step() * config.steps
    seconds = lead["timing"]["seconds"]
    rates = {name: [tokens / s for s in seconds[name]] for name in SYSTEMS}
    num_params = lead["num_params"]
    comm = lead["comm_bytes_per_step"]
    return {
        "tokens_per_block": tokens,
        "tokens_per_s": {name: spread(rates[name]) for name in SYSTEMS},
        "tokens_per_s_per_block": rates,
        "step_s_median": {name: statistics.median(seconds[name]) / config.steps for name in SYSTEMS},
        "ratio_plait_over_ddp": ratio_summary(rates["plait"], rates["ddp"]),
        # Secondary, robust to bursts of foreign load: the two systems' fastest blocks, and the
        # per-pair ratio of main-thread CPU seconds (all ranks), which ignores waiting altogether.
        "ratio_best_blocks": max(rates["plait"]) / max(rates["ddp"]),
        "ratio_cpu_work": ratio_summary(cpu_seconds(results, "ddp"), cpu_seconds(results, "plait")),
        "ratio_quiet_pairs": quiet_pairs_ratio(results, rates),
        "noise": {
            "cpu_share_min_over_ranks": {
                name: [min(shares) for shares in zip(*(r["cpu_share"][name] for r in results), strict=True)]
                for name in SYSTEMS
            },
            "load_at_block_start": lead["load_at_block_start"],
            "note": "cpu_share: main-thread CPU seconds / block wall seconds; well below ~0.9 means a shared box",
        },
        "target_ratio": TARGET_RATIO,
        "comm": {
            "plait_bytes_per_step_per_rank": statistics.median(comm) if comm else None,
            "plait_bytes_by_kind_last_block": lead["comm_bytes_by_kind_last_block"],
            "theory_bytes": 8 * num_params,
            "theory_formula": (
                "DDP: 2P fp32 elements per step = 8P bytes, counting an all-reduce as a reduce-scatter plus "
                "an all-gather (ZeRO paper; plait.distributed.comm); ring wire traffic a further (N-1)/N"
            ),
            "allreduce_payload_bytes": 4 * num_params,
        },
        "memory": {
            "model_state_bytes_per_rank": [r["model_state_bytes"] for r in results],
            "ddp_reducer_buffers": lead["model_state_bytes"]["ddp_reducer"],
            "plait_comm_buffers_note": "none besides the gradients: each .grad is a view into its bucket",
            "model_state_theory_bytes": 16 * num_params,
            "model_state_formula": "fp32 params 4P + grads 4P + AdamW exp_avg 4P + exp_avg_sq 4P = 16P",
            "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in results],
            "peak_rss_growth_bytes_per_rank": [r["peak_rss_growth_bytes_by_system"] for r in results],
            "peak_rss_note": (
                "one process per rank holds both systems; VmHWM is reset at the start of every timed block. "
                "peak_rss_bytes: the process's peak over the timed phase; growth: a system's largest rise of "
                "the peak over the RSS at its block's start (its per-step transient memory)"
            ),
        },
        "loss_check": {
            "warmup": lead["warmup_loss"],
            "last_block": {name: lead["block_losses"][name][-1] for name in SYSTEMS},
        },
    }


def pair_rows(summary: dict[str, Any], results: list[dict[str, Any]]) -> list[list[str]]:
    lead = results[0]
    seconds = lead["timing"]["seconds"]
    shares = summary["noise"]["cpu_share_min_over_ranks"]
    loads = lead["load_at_block_start"]
    rows = []
    for pair, order in enumerate(lead["timing"]["orders"]):
        rows.append(
            [
                str(pair),
                " ".join(order),
                f"{seconds['plait'][pair]:.2f}",
                f"{seconds['ddp'][pair]:.2f}",
                f"{summary['ratio_plait_over_ddp']['per_pair'][pair]:.3f}",
                f"{shares['plait'][pair]:.2f}/{shares['ddp'][pair]:.2f}",
                f"{loads['plait'][pair]:.1f}/{loads['ddp'][pair]:.1f}",
            ]
        )
    return rows


def print_report(summary: dict[str, Any], results: list[dict[str, Any]], config: BenchConfig) -> None:
    lead = results[0]
    ratio = summary["ratio_plait_over_ddp"]
    cfg = lead["model_config"]
    print(
        f"\nplait DP vs torch DDP | {PRESET}: d_model {cfg['d_model']}, {cfg['num_layers']} layers, "
        f"vocab {cfg['vocab_size']}, seq {config.seq}, P = {lead['num_params']:,} | "
        f"{WORLD_SIZE} ranks x 1 thread, gloo, batch {config.batch}/rank | "
        f"{config.pairs} pairs x {config.steps} steps"
    )
    reducer = lead["model_state_bytes"]["ddp_reducer"]
    buffers = {
        "plait": "0 (grads are views)",
        "ddp": format_bytes(0 if reducer["gradient_as_bucket_view"] else reducer["bucket_bytes"]),
    }
    rows = []
    for name in SYSTEMS:
        rate = summary["tokens_per_s"][name]
        states = lead["model_state_bytes"][name]
        rows.append(
            [
                name,
                f"{rate['median']:.1f}",
                f"{rate['min']:.1f}-{rate['max']:.1f}",
                f"{summary['step_s_median'][name]:.3f}",
                format_bytes(states["total"]),
                buffers[name],
            ]
        )
    headers = ["system", "tokens/s (median)", "min-max", "s/step", "model states/rank", "+ comm buffers/rank"]
    print(format_table(headers, rows))
    print()
    print(
        format_table(
            ["pair", "order", "plait s", "ddp s", "ratio", "cpu share p/d", "load p/d"], pair_rows(summary, results)
        )
    )
    print(
        f"\nratio plait/DDP: median {ratio['median']:.3f}  min-max {ratio['min']:.3f}-{ratio['max']:.3f}  "
        f"IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}"
    )
    quiet = summary["ratio_quiet_pairs"]
    if quiet["pairs"]:
        print(
            f"  quiet pairs only (cpu share >= {QUIET_CPU_SHARE} on every rank, {len(quiet['pairs'])} of "
            f"{len(ratio['per_pair'])}): median {quiet['median']:.3f} ({quiet['min']:.3f}-{quiet['max']:.3f})"
        )
    else:
        print(f"  no quiet pair (cpu share >= {QUIET_CPU_SHARE} on every rank): the box was shared throughout")
    cpu = summary["ratio_cpu_work"]
    print(
        f"  cross-checks: fastest blocks {summary['ratio_best_blocks']:.3f} | CPU work DDP/plait "
        f"median {cpu['median']:.3f} ({cpu['min']:.3f}-{cpu['max']:.3f}; main-thread CPU s, ignores waits)"
    )
    memory = summary["memory"]
    comm = summary["comm"]
    print(f"model states theory: {format_bytes(memory['model_state_theory_bytes'])} (16P)")
    peaks = ", ".join(format_bytes(b) for b in memory["peak_rss_bytes_per_rank"])
    print(f"peak RSS per rank over the timed phase (both systems in one process): {peaks}")
    print(
        f"plait comm per step per rank: {format_bytes(comm['plait_bytes_per_step_per_rank'])} "
        f"vs theory 2P elements = 8P bytes = {format_bytes(comm['theory_bytes'])} "
        f"(all-reduce payload 4P = {format_bytes(comm['allreduce_payload_bytes'])})"
    )
    losses = summary["loss_check"]
    print(
        "loss check (same weights, same data): "
        + ", ".join(f"{n} warm-up {losses['warmup'][n]:.4f} last {losses['last_block'][n]:.4f}" for n in SYSTEMS)
    )
    print(f"\ntarget ratio >= {TARGET_RATIO}: {verdict(ratio['median'], TARGET_RATIO)}")


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=None, help="A/B pairs (default 6, at least 5 for a figure)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (default 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per system first (default 1)")
    parser.add_argument(
        "--block-warmup", type=int, default=None, help="untimed steps before every block (default 1; 0: none)"
    )
    parser.add_argument("--batch", type=int, default=None, help="sequences per rank per step (default 4)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 128)")
    parser.add_argument("--d-model", type=int, default=None, help="override the preset's d_model")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--heads", type=int, default=None, help="override the preset's head count")
    parser.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also profile 2 steps of each system on rank 0")
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke check in ~20 s")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/dp.json)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the ranks count as hung")
    args = parser.parse_args(argv)
    base = {"d_model": 128, "layers": 4, "seq": 64, "batch": 4, "pairs": 5, "steps": 4} if args.quick else {}
    chosen = {
        key: getattr(args, key)
        for key in ("pairs", "steps", "warmup", "block_warmup", "batch", "seq", "d_model", "layers", "heads", "vocab")
        if getattr(args, key) is not None
    }
    config = BenchConfig(**{**base, **chosen}, seed=args.seed, profile=args.profile, quick=args.quick)
    if config.pairs < 1 or config.steps < 1 or config.warmup < 1 or config.block_warmup < 0:
        parser.error("--pairs, --steps and --warmup must be at least 1, --block-warmup at least 0")
    if config.pairs < 5:
        print(f"note: {config.pairs} pairs; quote a ratio from at least 5", file=sys.stderr)
    default_name = "dp-quick.json" if config.quick else "dp.json"
    return config, args.out or RESULTS_DIR / default_name, args.timeout


def main(argv: list[str] | None = None) -> int:
    config, out_path, timeout_s = parse_args(argv)
    results = run_ranks(rank_main, WORLD_SIZE, config, num_threads=1, timeout_s=timeout_s)
    summary = summarize(results, config)
    print_report(summary, results, config)
    profiles = results[0].pop("profile", None)
    if profiles:
        for name, table in profiles.items():
            path = out_path.with_name(f"{out_path.stem}-profile-{name}.txt")
            path.write_text(table)
            print(f"\nprofile of 2 {name} steps (rank 0), top ops by self CPU time -> {path}")
            print("\n".join(table.splitlines()[:22]))
    payload = {
        "benchmark": "dp",
        "systems": {"A": "plait (plait.boost, Plan(dp=2))", "B": "torch DistributedDataParallel"},
        "config": {**asdict(config), "preset": PRESET, "world_size": WORLD_SIZE, "threads_per_rank": 1},
        "environment": environment(),
        "summary": summary,
        "per_rank": results,
        "verdict": verdict(summary["ratio_plait_over_ddp"]["median"], TARGET_RATIO),
    }
    print(f"\nwrote {write_json(out_path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
