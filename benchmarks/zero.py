"""plait ZeRO stages 0-3: memory and traffic per rank against the formulas, speed against PyTorch's peers.

Work: the `bench-dp` GPT (d_model 512, 8 layers, vocab 8192, seq 128, tied
embeddings, P = 29.5M), 4 sequences per rank per step, fp32 AdamW, 2 ranks of
1 thread each over gloo (forked, FileStore rendezvous: common.run_ranks).
Three phases, all in the same two rank processes:

1. memory: one plait engine per stage (0-3) and precision (fp32, bf16), one
   optimizer step on a short batch, then the model-state bytes per rank counted
   from the live tensors next to the ZeRO paper's formulas; for stage 3 (built
   lazily on the meta device) the peak of parameter elements held in a step
   next to P/N + the two largest units.
2. comm: bytes per step per rank counted by plait (all-reduce 2x its payload,
   reduce-scatter and all-gather 1x) for stages 0-3 with 1 and 4 micro-batches,
   with reduce_op="reduce_scatter" (the ZeRO collectives) and "auto"
   (all-reduce on gloo), next to the theory. Counted, not timed: short batches.
3. speed: tokens/s, A B A B alternated, each stage against its PyTorch peer on
   the same weights and batches: stage 0 vs DDP; stages 1 and 2 vs FSDP2
   `fully_shard(reshard_after_forward=False)` on every block and the root
   (ZeRO-2-like); stage 3 vs FSDP2 with `reshard_after_forward=True`. The
   figure per stage is the median per-pair ratio plait/peer with its spread.
   Stages run in priority order 3, 2, 1, 0; one whose estimated cost would
   overrun the time budget is skipped and reported as such.

Where DeepSpeed is importable (benchmarks/zero_deepspeed.py: `pip install --target
DIR ...` and PYTHONPATH=DIR), each timed stage also alternates plait with DeepSpeed
ZeRO at the same stage; otherwise the JSON says why it did not run.

    python benchmarks/zero.py                 # the full run (~8 min on 2 cores)
    python benchmarks/zero.py --quick         # the tiny model, a smoke check
    python benchmarks/zero.py --stages 3 2 --pairs 6 --steps 3
    python benchmarks/zero.py --phases speed --stages 3 --pairs 1 --profile   # profile tables only
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import (
    RESULTS_DIR,
    count_local_model_state_bytes,
    environment,
    finish,
    format_bytes,
    format_table,
    load_average,
    model_state_bytes,
    ratio_summary,
    run_alternating,
    run_ranks,
    spread,
    storage_bytes,
    timed_block,
    wait_for_quiet,
)
from torch.nn.parallel import DistributedDataParallel
from zero_deepspeed import DeepSpeedSystem, deepspeed_missing

import plait
from plait.models import build
from plait.models.factory import resolve_config

WORLD_SIZE = 2
STAGES = (0, 1, 2, 3)
SPEED_PRIORITY = (3, 2, 1, 0)  # the order stages are timed in, and kept when time runs short
PHASES = ("memory", "comm", "speed")
PEERS = {
    0: ("ddp", "torch DDP"),
    1: ("fsdp2-noreshard", "FSDP2 fully_shard(reshard_after_forward=False) per block + root"),
    2: ("fsdp2-noreshard", "FSDP2 fully_shard(reshard_after_forward=False) per block + root"),
    3: ("fsdp2-reshard", "FSDP2 fully_shard(reshard_after_forward=True) per block + root"),
}
# Model-state bytes per rank as a*P + b*P/N (ZeRO paper, Adam): fp32, and mixed precision
# (16-bit params and grads, fp32 master + Adam moments = 12P).
FORMULAS = {
    "fp32": {0: (16, 0), 1: (8, 8), 2: (4, 12), 3: (0, 16)},
    "bf16": {0: (16, 0), 1: (4, 12), 2: (2, 14), 3: (0, 16)},
}
FORMULA_TEXT = {
    "fp32": {0: "16P", 1: "8P+8P/N", 2: "4P+12P/N", 3: "16P/N"},
    "bf16": {0: "16P", 1: "4P+12P/N", 2: "2P+14P/N", 3: "16P/N"},
}


@dataclass(frozen=True)
class ZeroBenchConfig:
    preset: str = "bench-dp"
    seq: int = 128  # the model's max_seq_len and the timed sequences' length
    batch: int = 4  # sequences per rank per timed step
    pairs: int = 5
    steps: int = 2  # timed steps per block
    warmup: int = 1  # untimed steps per system before the first block
    block_warmup: int = 1  # untimed steps of a system right before each of its blocks
    stages: tuple[int, ...] = SPEED_PRIORITY
    phases: tuple[str, ...] = PHASES
    reduce_op: str = "auto"  # plait's reduce_op in the timed runs (its default)
    short_seq: int = 16  # sequence length in the memory and comm phases (neither depends on it)
    short_batch: int = 4  # sequences per rank there (a multiple of every micro-batch count)
    bf16_batch: int = 1  # bf16 memory rows: bf16 matmuls crawl on this CPU (FACTS.md), so 1 x short_seq
    microbatches: tuple[int, ...] = (1, 4)
    budget_s: float = 480.0  # the whole run, from the ranks' start; speed stages that would overrun are skipped
    stage_estimate_s: float = 90.0  # assumed cost of a speed stage before one has been measured
    lr: float = 3e-4
    eps: float = 1e-8
    seed: int = 0
    profile: bool = False
    quick: bool = False
    start_time: float = field(default=0.0, compare=False)  # time.time() when the ranks were launched

    def model_overrides(self) -> dict[str, int]:
        return {"max_seq_len": self.seq}

    def tokens_per_step(self) -> int:
        return WORLD_SIZE * self.batch * self.seq


def build_model(config: ZeroBenchConfig, *, lazy: bool = False) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    if lazy:
        with torch.device("meta"):
            return build(config.preset, **config.model_overrides())
    return build(config.preset, **config.model_overrides())


def make_optimizer(config: ZeroBenchConfig):
    def optimizer(params):
        return torch.optim.AdamW(params, lr=config.lr, eps=config.eps)

    return optimizer


def boost(model: torch.nn.Module, config: ZeroBenchConfig, **plan: Any) -> plait.Engine:
    return plait.boost(
        model,
        optimizer=make_optimizer(config),
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=WORLD_SIZE, **plan),
    )


def make_batches(
    config: ZeroBenchConfig, *, vocab_size: int, rank: int, num_batches: int, batch: int, seq: int
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(config.seed * 1000 + 17 + rank)
    return [torch.randint(0, vocab_size, (batch, seq), generator=gen) for _ in range(num_batches)]


def lm_batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": tokens, "labels": tokens}


def global_mean(value: torch.Tensor) -> float:
    value = value.detach().clone().float()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def free() -> None:
    gc.collect()


# ---------------------------------------------------------------------------
# Phase 1: model-state memory per rank


def formula_bytes(precision: str, stage: int, num_params: int) -> float:
    a, b = FORMULAS[precision][stage]
    return a * num_params + b * num_params / WORLD_SIZE


UNIT_TENSORS = ("full", "param_shard", "master_shard", "grad_full", "grad_shard")


def unit_storage_bytes(engine: plait.Engine) -> dict[str, int] | None:
    """A cross-check of plait's count: the bytes behind every tensor its ZeRO units hold, plus Adam's state.

    None for fp32 stage 0 (plain bucketed data parallel has no units).
    """
    units = getattr(engine.data_parallel, "units", None)
    if units is None:
        return None
    seen: set[int] = set()
    counts = {name: storage_bytes((getattr(u, name) for u in units), seen=seen) for name in UNIT_TENSORS}
    state = [t for s in engine.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    counts["optimizer"] = storage_bytes(state, seen=seen)
    counts["total"] = sum(counts.values())
    return counts


def memory_row(rank: int, config: ZeroBenchConfig, stage: int, precision: str) -> dict[str, Any]:
    lazy = stage == 3
    model = build_model(config, lazy=lazy)
    num_params = sum(p.numel() for p in model.parameters())
    engine = boost(model, config, zero=stage, precision=precision)
    batch = config.bf16_batch if precision == "bf16" else config.short_batch
    tokens = make_batches(
        config, vocab_size=model.config.vocab_size, rank=rank, num_batches=1, batch=batch, seq=config.short_seq
    )[0]
    started = time.perf_counter()
    engine.train_step(lm_batch(tokens))
    step_s = time.perf_counter() - started
    states = model_state_bytes(model, engine.optimizer)
    units = unit_storage_bytes(engine)
    expected = formula_bytes(precision, stage, num_params)
    row: dict[str, Any] = {
        "stage": stage,
        "precision": precision,
        "lazy_init": lazy,
        "num_params": num_params,
        "measured": states,
        "formula": FORMULA_TEXT[precision][stage],
        "formula_bytes": expected,
        "ratio_measured_over_formula": states["total"] / expected,
        "difference_bytes": states["total"] - expected,
        "unit_storages": units,  # cross-check: what the ZeRO units hold (None: no units)
        "unit_storages_minus_measured": None if units is None else units["total"] - states["total"],
        "step_s": step_s,
        "batch": [batch, config.short_seq],
    }
    if stage == 3:
        units = engine.data_parallel.units
        largest_two = sum(sorted(u.layout.padded_numel for u in units)[-2:])
        shard_elements = sum(u.layout.shard_size for u in units)
        bound = math.ceil(num_params / WORLD_SIZE) + largest_two
        peak = engine.data_parallel.peak_held_elements
        row["stage3_held"] = {
            "peak_held_elements": peak,
            "shard_elements": shard_elements,
            "two_largest_units_elements": largest_two,
            "bound_elements": bound,
            "bound_formula": "ceil(P/N) + the two largest units (padded)",
            "ratio_peak_over_bound": peak / bound,
            "num_units": len(units),
            "units": [{"name": u.names[0].rsplit(".", 1)[0], "elements": u.layout.numel} for u in units],
        }
    del engine, model
    free()
    return row


def memory_phase(rank: int, config: ZeroBenchConfig) -> list[dict[str, Any]]:
    rows = []
    for precision in ("fp32", "bf16"):
        for stage in STAGES:
            rows.append(memory_row(rank, config, stage, precision))
    return rows


# ---------------------------------------------------------------------------
# Phase 2: communication per step per rank


def comm_theory_elements(stage: int, k: int, reduce_op: str) -> tuple[int, str]:
    """(elements as a multiple of P, formula) per step per rank, counted as plait.distributed.comm does."""
    if reduce_op == "reduce_scatter" or stage == 0:
        # gradient sum: reduce-scatter P (all-reduce 2P at stage 0); all-gather P after the step (1-2)
        # or twice per micro-batch (3)
        return {0: (2, "2P"), 1: (2, "2P"), 2: (k + 1, "(k+1)P"), 3: (3 * k, "3kP")}[stage]
    # all-reduce (2P counted) in place of each reduce-scatter (P)
    return {1: (3, "3P"), 2: (2 * k + 1, "(2k+1)P"), 3: (4 * k, "4kP")}[stage]


def comm_phase(rank: int, config: ZeroBenchConfig) -> list[dict[str, Any]]:
    rows = []
    for reduce_op in ("reduce_scatter", "auto"):
        for stage in STAGES:
            for k in config.microbatches:
                model = build_model(config)
                num_params = sum(p.numel() for p in model.parameters())
                engine = boost(model, config, zero=stage, microbatches=k, reduce_op=reduce_op)
                tokens = make_batches(
                    config,
                    vocab_size=model.config.vocab_size,
                    rank=rank,
                    num_batches=1,
                    batch=config.short_batch,
                    seq=config.short_seq,
                )[0]
                engine.comm.reset()  # set-up broadcasts are not counted anyway
                engine.train_step(lm_batch(tokens))
                measured = engine.comm.total_bytes
                multiple, text = comm_theory_elements(stage, k, reduce_op)
                theory = 4 * multiple * num_params
                rows.append(
                    {
                        "stage": stage,
                        "microbatches": k,
                        "reduce_op": reduce_op,
                        "collective": "all_reduce"
                        if stage == 0 or engine.data_parallel.config.use_all_reduce
                        else "reduce_scatter",
                        "bytes_per_step_per_rank": measured,
                        "bytes_by_kind": dict(engine.comm.bytes_by_kind),
                        "theory": f"{text} x 4 bytes",
                        "theory_bytes": theory,
                        "ratio_measured_over_theory": measured / theory,
                        "num_params": num_params,
                    }
                )
                del engine, model
                free()
    return rows


# ---------------------------------------------------------------------------
# Phase 3: speed against the peers


class PlaitSystem:
    def __init__(self, model: torch.nn.Module, config: ZeroBenchConfig, stage: int) -> None:
        self.model = model
        self.engine = boost(model, config, zero=stage, reduce_op=config.reduce_op)
        self.states: dict[str, int] | None = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        loss = self.engine.train_step(lm_batch(tokens)).loss
        if self.states is None:
            self.states = model_state_bytes(self.model, self.engine.optimizer)
        return loss


class TorchPeer:
    """A plain torch training step around a wrapped model; model states counted at the first step."""

    def __init__(self, model: torch.nn.Module, wrapped: torch.nn.Module, config: ZeroBenchConfig) -> None:
        self.model = model
        self.wrapped = wrapped
        self.optimizer = make_optimizer(config)(model.parameters())
        self.states: dict[str, int] | None = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = lm_batch(tokens)
        loss_sum, num_tokens = plait.losses.causal_lm(self.wrapped(**batch), batch)
        loss = loss_sum / num_tokens  # the local mean; DDP and FSDP2 average gradients over ranks
        loss.backward()
        self.optimizer.step()
        if self.states is None:  # grads are alive until zero_grad
            self.states = count_local_model_state_bytes(self.model, self.optimizer)
        self.optimizer.zero_grad()
        return loss.detach()


def make_peer(name: str, model: torch.nn.Module, config: ZeroBenchConfig) -> TorchPeer:
    if name == "ddp":
        return TorchPeer(model, DistributedDataParallel(model), config)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    reshard = name == "fsdp2-reshard"
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return TorchPeer(model, model, config)


class Runner:
    """One system's step counter over the shared batch list, with per-block records."""

    def __init__(self, system: Any, batches: list[torch.Tensor], config: ZeroBenchConfig) -> None:
        self.system = system
        self.batches = batches
        self.config = config
        self.step_index = 0
        self.block_losses: list[float] = []  # global mean loss of each block's last step
        self.load_at_start: list[float | None] = []
        self.cpu_share: list[float] = []  # main-thread CPU s / wall s (low when the box is shared)
        self.comm_bytes_per_step: list[float] = []

    def run_steps(self, num_steps: int) -> torch.Tensor:
        loss = torch.zeros(())
        for _ in range(num_steps):
            loss = self.system.step(self.batches[self.step_index % len(self.batches)])
            self.step_index += 1
        return loss

    def block(self) -> float:
        self.run_steps(self.config.block_warmup)  # re-faults memory the other system's block took
        engine = getattr(self.system, "engine", None)
        if engine is not None:
            engine.comm.reset()
        self.load_at_start.append(load_average())
        cpu_start = time.thread_time()
        seconds, loss = timed_block(lambda: self.run_steps(self.config.steps))
        self.cpu_share.append((time.thread_time() - cpu_start) / seconds)
        if engine is not None:
            self.comm_bytes_per_step.append(engine.comm.total_bytes / self.config.steps)
        self.block_losses.append(global_mean(loss))
        return seconds


def profile_steps(runners: dict[str, Runner], *, rank: int, num_steps: int = 2) -> dict[str, str]:
    """torch.profiler tables (self CPU time) of `num_steps` steps per system on rank 0; every rank steps."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, runner in runners.items():
        runner.run_steps(1)
        dist.barrier()
        if rank == 0:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.run_steps(num_steps)
            tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        else:
            runner.run_steps(num_steps)
        dist.barrier()
    return tables


def speed_stage(rank: int, config: ZeroBenchConfig, stage: int) -> dict[str, Any]:
    peer_name, peer_label = PEERS[stage]
    model = build_model(config)
    reference = copy.deepcopy(model)  # the same initial weights for both
    ds_model = copy.deepcopy(model) if deepspeed_missing() is None else None
    num_params = sum(p.numel() for p in model.parameters())
    systems = {"plait": PlaitSystem(model, config, stage), peer_name: make_peer(peer_name, reference, config)}
    batches = make_batches(
        config, vocab_size=model.config.vocab_size, rank=rank, num_batches=8, batch=config.batch, seq=config.seq
    )
    if ds_model is not None:
        systems["deepspeed"] = DeepSpeedSystem(ds_model, stage=stage, rank=rank, world_size=WORLD_SIZE, config=config)
    runners = {name: Runner(system, batches, config) for name, system in systems.items()}
    warmup_loss = {name: global_mean(runner.run_steps(config.warmup)) for name, runner in runners.items()}
    for runner in runners.values():
        runner.step_index = 0  # every system replays the same batches from here on
    started = time.perf_counter()
    timing = run_alternating({name: runners[name].block for name in ("plait", peer_name)}, num_pairs=config.pairs)
    ds_timing = None
    if ds_model is not None:  # a second A B alternation, plait against DeepSpeed (the harness pairs two)
        ds_timing = run_alternating(
            {name: runners[name].block for name in ("plait", "deepspeed")}, num_pairs=config.pairs
        )
    result = {
        "stage": stage,
        "peer": peer_name,
        "peer_label": peer_label,
        "num_params": num_params,
        "timing": timing,
        "timed_wall_s": time.perf_counter() - started,
        "warmup_loss": warmup_loss,
        "block_losses": {name: r.block_losses for name, r in runners.items()},
        "load_at_block_start": {name: r.load_at_start for name, r in runners.items()},
        "cpu_share": {name: r.cpu_share for name, r in runners.items()},
        "plait_comm_bytes_per_step": runners["plait"].comm_bytes_per_step,
        "plait_comm_bytes_by_kind_last_block": dict(systems["plait"].engine.comm.bytes_by_kind),
        "model_state_bytes": {name: s.states for name, s in systems.items()},
        "deepspeed_timing": ds_timing,
        "deepspeed_version": getattr(systems.get("deepspeed"), "version", None),
    }
    if config.profile:
        result["profile"] = profile_steps(runners, rank=rank)
    del runners, systems, model, reference
    free()
    return result


def agree(decision: bool) -> bool:
    """Rank 0's decision, on every rank (so all ranks run the same collectives)."""
    flag = torch.tensor([1 if decision else 0])
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def speed_phase(rank: int, config: ZeroBenchConfig) -> dict[str, Any]:
    done: dict[int, Any] = {}
    skipped: dict[int, str] = {}
    stage_walls: list[float] = []
    for stage in config.stages:
        elapsed = time.time() - config.start_time
        estimate = max(stage_walls) if stage_walls else config.stage_estimate_s
        run = agree(not stage_walls or elapsed + estimate <= config.budget_s)  # the first stage always runs
        if not run:
            skipped[stage] = (
                f"time budget: {elapsed:.0f} s spent + ~{estimate:.0f} s for this stage > {config.budget_s:.0f} s"
            )
            continue
        started = time.time()
        done[stage] = speed_stage(rank, config, stage)
        stage_walls.append(time.time() - started)
        done[stage]["stage_wall_s"] = stage_walls[-1]
    return {"stages": done, "skipped": skipped}


# ---------------------------------------------------------------------------


def rank_main(rank: int, world_size: int, config: ZeroBenchConfig) -> dict[str, Any]:
    # torch 2.13 deprecates the collective names plait calls (FACTS.md); once per rank is noise here
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use.*", category=FutureWarning)
    result: dict[str, Any] = {"rank": rank, "phase_wall_s": {}}
    for phase, fn in (("memory", memory_phase), ("comm", comm_phase), ("speed", speed_phase)):
        if phase in config.phases:
            started = time.perf_counter()
            result[phase] = fn(rank, config)
            result["phase_wall_s"][phase] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------
# Summary and report


def summarize_speed(results: list[dict[str, Any]], config: ZeroBenchConfig) -> dict[str, Any]:
    lead = results[0]["speed"]
    tokens = config.tokens_per_step() * config.steps
    out: dict[str, Any] = {"tokens_per_block": tokens, "stages": {}, "skipped": lead["skipped"]}
    for stage, record in lead["stages"].items():
        peer = record["peer"]
        seconds = record["timing"]["seconds"]
        rates = {name: [tokens / s for s in values] for name, values in seconds.items()}
        first = {name: losses[0] for name, losses in record["block_losses"].items()}
        rel = abs(first["plait"] - first[peer]) / abs(first[peer])
        out["stages"][stage] = {
            "peer": peer,
            "peer_label": record["peer_label"],
            "tokens_per_s": {name: spread(values) for name, values in rates.items()},
            "tokens_per_s_per_block": rates,
            "seconds_per_block": seconds,
            "orders": record["timing"]["orders"],
            "step_s_median": {name: statistics.median(values) / config.steps for name, values in seconds.items()},
            "ratio_plait_over_peer": ratio_summary(rates["plait"], rates[peer]),
            "ratio_best_blocks": max(rates["plait"]) / max(rates[peer]),
            "loss_check": {
                "warmup": record["warmup_loss"],
                "first_block": first,
                "first_block_rel_diff": rel,
                "agree": rel < 1e-3,
            },
            "cpu_share_min_over_ranks": {
                name: [
                    min(v) for v in zip(*(r["speed"]["stages"][stage]["cpu_share"][name] for r in results), strict=True)
                ]
                for name in seconds
            },
            "load_at_block_start": record["load_at_block_start"],
            "model_state_bytes_rank0": record["model_state_bytes"],
            "plait_comm_bytes_per_step": statistics.median(record["plait_comm_bytes_per_step"]),
            "plait_comm_bytes_by_kind_last_block": record["plait_comm_bytes_by_kind_last_block"],
            "stage_wall_s": record["stage_wall_s"],
        }
        if record.get("deepspeed_timing"):
            out["stages"][stage]["deepspeed"] = summarize_deepspeed(record, tokens=tokens, config=config)
    return out


def summarize_deepspeed(record: dict[str, Any], *, tokens: int, config: ZeroBenchConfig) -> dict[str, Any]:
    """plait against DeepSpeed from the stage's second alternation; first blocks' losses compared."""
    seconds = record["deepspeed_timing"]["seconds"]
    rates = {name: [tokens / s for s in values] for name, values in seconds.items()}
    first = {name: record["block_losses"][name][0] for name in ("plait", "deepspeed")}
    rel = abs(first["plait"] - first["deepspeed"]) / abs(first["deepspeed"])
    return {
        "version": record["deepspeed_version"],
        "tokens_per_s": {name: spread(values) for name, values in rates.items()},
        "seconds_per_block": seconds,
        "orders": record["deepspeed_timing"]["orders"],
        "step_s_median": {name: statistics.median(values) / config.steps for name, values in seconds.items()},
        "ratio_plait_over_deepspeed": ratio_summary(rates["plait"], rates["deepspeed"]),
        "loss_check": {"first_block": first, "first_block_rel_diff": rel, "agree": rel < 1e-3},
    }


def print_memory(rows: list[dict[str, Any]]) -> None:
    for precision in ("fp32", "bf16"):
        subset = [r for r in rows if r["precision"] == precision]
        if not subset:
            continue
        num_params = subset[0]["num_params"]
        batch = subset[0]["batch"]
        print(
            f"\nmodel states per rank, {precision} AdamW, N = {WORLD_SIZE}, P = {num_params:,} "
            f"(after the first optimizer step on {batch[0]} x {batch[1]} tokens per rank)"
        )
        table = []
        for r in subset:
            m = r["measured"]
            table.append(
                [
                    f"stage {r['stage']}" + (" (lazy)" if r["lazy_init"] else ""),
                    format_bytes(m["params"]),
                    format_bytes(m["grads"]),
                    format_bytes(m["optimizer"]),
                    format_bytes(m["total"]),
                    r["formula"],
                    format_bytes(r["formula_bytes"]),
                    f"{r['ratio_measured_over_formula']:.3f}",
                    f"{'+' if r['difference_bytes'] >= 0 else '-'}{format_bytes(abs(r['difference_bytes']))}",
                    "n/a" if r.get("unit_storages") is None else format_bytes(r["unit_storages"]["total"]),
                    f"{r['step_s']:.1f}",
                ]
            )
        headers = [
            "",
            "params",
            "grads",
            "optimizer",
            "total",
            "formula",
            "= bytes",
            "measured/formula",
            "diff",
            "unit storages",
            "step s",
        ]
        print(format_table(headers, table))
        for r in subset:
            held = r.get("stage3_held")
            if held:
                print(
                    f"  stage 3 ({precision}) peak parameter elements held: {held['peak_held_elements']:,} vs "
                    f"P/N + two largest units = {held['bound_elements']:,} "
                    f"(ratio {held['ratio_peak_over_bound']:.3f}; shards {held['shard_elements']:,}, "
                    f"two largest units {held['two_largest_units_elements']:,}, {held['num_units']} units)"
                )
        for r in subset:
            gap = r.get("unit_storages_minus_measured")
            if gap:
                print(
                    f"  stage {r['stage']} ({precision}): the units hold {format_bytes(gap)} more than "
                    "plait.train.metrics.model_state_bytes counts ("
                    + ", ".join(f"{k} {format_bytes(v)}" for k, v in r["unit_storages"].items() if k != "total")
                    + ")"
                )
        if precision == "bf16":
            print(
                "  plait keeps fp32 gradient shards (and, at stages 0-1, a 16-bit full gradient buffer) for "
                "accurate accumulation; the mixed-precision formulas assume 16-bit gradients."
            )


def print_comm(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print(
        f"\ncommunication per step per rank (counted, ZeRO-paper convention: all-reduce 2x payload, "
        f"reduce-scatter/all-gather 1x; P = {rows[0]['num_params']:,})"
    )
    table = []
    for r in rows:
        kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(r["bytes_by_kind"].items()))
        table.append(
            [
                f"stage {r['stage']}",
                str(r["microbatches"]),
                r["reduce_op"],
                r["collective"],
                format_bytes(r["bytes_per_step_per_rank"]),
                r["theory"],
                format_bytes(r["theory_bytes"]),
                f"{r['ratio_measured_over_theory']:.4f}",
                kinds,
            ]
        )
    headers = ["", "k", "reduce_op", "grad collective", "measured", "theory", "= bytes", "ratio", "by kind"]
    print(format_table(headers, table))


def print_speed(speed: dict[str, Any], config: ZeroBenchConfig, model_line: str) -> None:
    print(
        f"\nspeed: plait vs PyTorch peer | {model_line} | {WORLD_SIZE} ranks x 1 thread, gloo, "
        f"{config.batch} x {config.seq} tokens/rank/step, fp32 AdamW | plait reduce_op={config.reduce_op} | "
        f"{config.pairs} pairs x {config.steps} steps (+{config.block_warmup} untimed)"
    )
    table = []
    for stage in sorted(speed["stages"]):
        s = speed["stages"][stage]
        peer = s["peer"]
        ratio = s["ratio_plait_over_peer"]
        losses = s["loss_check"]["first_block"]
        table.append(
            [
                f"stage {stage}",
                peer,
                f"{s['tokens_per_s']['plait']['median']:.1f}",
                f"{s['tokens_per_s'][peer]['median']:.1f}",
                f"{ratio['median']:.3f}",
                f"{ratio['min']:.3f}-{ratio['max']:.3f}",
                f"{ratio['q1']:.3f}-{ratio['q3']:.3f}",
                f"{s['ratio_best_blocks']:.3f}",
                f"{losses['plait']:.5f} / {losses[peer]:.5f}",
                "yes" if s["loss_check"]["agree"] else f"NO ({s['loss_check']['first_block_rel_diff']:.1e})",
            ]
        )
    headers = [
        "",
        "peer",
        "plait tok/s",
        "peer tok/s",
        "ratio",
        "min-max",
        "IQR",
        "best blocks",
        "first-block loss plait / peer",
        "agree",
    ]
    print(format_table(headers, table))
    for stage in sorted(speed["stages"]):
        s = speed["stages"][stage]
        peer = s["peer"]
        secs = s["seconds_per_block"]
        per_pair = " ".join(f"{p:.2f}/{q:.2f}" for p, q in zip(secs["plait"], secs[peer], strict=True))
        shares = s["cpu_share_min_over_ranks"]
        print(
            f"  stage {stage} block s plait/{peer}: {per_pair} | min cpu share plait {min(shares['plait']):.2f}, "
            f"{peer} {min(shares[peer]):.2f} | states/rank plait "
            f"{format_bytes(s['model_state_bytes_rank0']['plait']['total'])}, {peer} "
            f"{format_bytes(s['model_state_bytes_rank0'][peer]['total'])}"
        )
    for stage, reason in speed["skipped"].items():
        print(f"  stage {stage}: skipped ({reason})")
    for stage in sorted(speed["stages"]):
        ds = speed["stages"][stage].get("deepspeed")
        if ds:
            ratio, losses = ds["ratio_plait_over_deepspeed"], ds["loss_check"]["first_block"]
            print(
                f"  stage {stage} vs DeepSpeed {ds['version']} ZeRO-{stage}: tok/s plait "
                f"{ds['tokens_per_s']['plait']['median']:.1f}, deepspeed {ds['tokens_per_s']['deepspeed']['median']:.1f}"
                f" | ratio {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}) | first-block loss "
                f"{losses['plait']:.5f} / {losses['deepspeed']:.5f}"
            )
    print(f"  DeepSpeed: {deepspeed_missing() or 'ran beside each timed stage (above)'}")


def parse_args(argv: list[str] | None = None) -> tuple[ZeroBenchConfig, Path, float, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model: a smoke check in seconds")
    parser.add_argument("--pairs", type=int, default=None, help="A/B pairs per stage (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (default 2)")
    parser.add_argument("--block-warmup", type=int, default=None, help="untimed steps before each block (default 1)")
    parser.add_argument(
        "--stages", type=int, nargs="+", default=None, help="stages to time, in this order (default 3 2 1 0)"
    )
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=None, help="default: memory comm speed")
    parser.add_argument("--reduce-op", choices=("auto", "reduce_scatter", "all_reduce"), default="auto")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of 2 steps per system")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/zero.json)")
    parser.add_argument("--no-wait", action="store_true", help="don't wait for benchmarks/dp.py to finish")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks count as hung")
    args = parser.parse_args(argv)
    base: dict[str, Any] = (
        {"preset": "tiny", "seq": 64, "budget_s": 120.0, "stage_estimate_s": 10.0} if args.quick else {}
    )
    chosen = {
        "pairs": args.pairs,
        "steps": args.steps,
        "block_warmup": args.block_warmup,
        "stages": tuple(args.stages) if args.stages else None,
        "phases": tuple(args.phases) if args.phases else None,
        "budget_s": args.budget,
    }
    chosen = {key: value for key, value in chosen.items() if value is not None}
    config = ZeroBenchConfig(
        **{**base, **chosen}, reduce_op=args.reduce_op, seed=args.seed, profile=args.profile, quick=args.quick
    )
    if any(stage not in STAGES for stage in config.stages):
        parser.error(f"--stages takes values among {STAGES}")
    if config.pairs < 1 or config.steps < 1 or config.block_warmup < 0:
        parser.error("--pairs and --steps must be at least 1, --block-warmup at least 0")
    if config.pairs < 5 and "speed" in config.phases:
        print(f"note: {config.pairs} pairs; quote a ratio from at least 5", file=sys.stderr)
    default_name = "zero-quick.json" if config.quick else "zero.json"
    return config, args.out or RESULTS_DIR / default_name, args.timeout, args.no_wait


def main(argv: list[str] | None = None) -> int:
    config, out_path, timeout_s, no_wait = parse_args(argv)
    wait = {"skipped": True} if no_wait else wait_for_quiet("benchmarks/dp.py", poll_s=30, max_wait_s=1200)
    load_at_start = load_average()
    print(f"1-minute load average at start: {load_at_start}", flush=True)
    config = ZeroBenchConfig(**{**asdict(config), "start_time": time.time()})
    results = run_ranks(rank_main, WORLD_SIZE, config, num_threads=1, timeout_s=timeout_s)
    wall_s = time.time() - config.start_time
    lead = results[0]

    num_params = None  # P, the same in every phase
    for phase in ("memory", "comm"):
        if lead.get(phase):
            num_params = lead[phase][0]["num_params"]
    if lead.get("speed", {}).get("stages"):
        num_params = next(iter(lead["speed"]["stages"].values()))["num_params"]
    cfg = resolve_config(config.preset, **config.model_overrides())
    model_line = (
        f"{config.preset}: d_model {cfg.d_model}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
        f"seq {config.seq}, P = {num_params:,}"
    )

    payload: dict[str, Any] = {
        "benchmark": "zero",
        "config": {**asdict(config), "world_size": WORLD_SIZE, "threads_per_rank": 1, "backend": "gloo"},
        "environment": environment(),
        "load_average_1min_at_start": load_at_start,
        "wait_for_dp_benchmark": wait,
        "wall_s": wall_s,
        "phase_wall_s": lead["phase_wall_s"],
        "deepspeed": deepspeed_missing() or "ran in the speed phase (speed.stages.N.deepspeed)",
    }
    if "memory" in lead:
        print_memory(lead["memory"])
        payload["memory"] = {
            "rank0": lead["memory"],
            "rank1_totals": [r["measured"]["total"] for r in results[1]["memory"]],
        }
        payload["memory"]["notes"] = (
            "model-state bytes counted by plait.train.metrics.model_state_bytes after the first optimizer step; "
            "they do not depend on the batch, so a short batch is used (bf16: 1 sequence, since bf16 matmuls run "
            "at ~1.3 GFLOP/s on this CPU). Stage 3 is built lazily on the meta device."
        )
    if "comm" in lead:
        print_comm(lead["comm"])
        payload["comm"] = {
            "rank0": lead["comm"],
            "notes": (
                "one step per row after a counter reset, on short sequences (bytes do not depend on them); "
                "theory in fp32 elements x 4 bytes; the small excess is the token-count, loss and grad-norm "
                "all-reduces and padding of units to a multiple of N. Ring wire traffic is a further (N-1)/N."
            ),
        }
    if "speed" in lead:
        speed = summarize_speed(results, config)
        print_speed(speed, config, model_line)
        payload["speed"] = speed
        payload["speed_per_rank"] = [
            {
                stage: {k: v for k, v in record.items() if k != "profile"}
                for stage, record in r["speed"]["stages"].items()
            }
            for r in results
        ]
        for stage, record in lead["speed"]["stages"].items():
            for name, table in (record.get("profile") or {}).items():
                path = out_path.with_name(f"{out_path.stem}-profile-stage{stage}-{name}.txt")
                path.write_text(table)
                print(f"\nprofile of 2 steps, stage {stage}, {name} (rank 0) -> {path}")
                print("\n".join(table.splitlines()[:25]))
    finish(out_path, payload, wall_s=wall_s, phase_wall_s=lead["phase_wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
