"""plait's pipeline schedules: throughput, measured bubbles against theory, and torch.distributed.pipelining.

Three parts, each on forked gloo ranks of 1 thread:

1. real layers, p=2: a GPT (d_model 256, 8 layers, vocab 8192, seq 128, untied embeddings) split over
   2 ranks, m micro-batches of 2 sequences, for m in {4, 8, 16} and the schedules gpipe, 1f1b,
   interleaved (v=2) and zb-h1. Per configuration: tokens/s (median over the timed steps) and the
   bubble of every stage, measured from plait's own timeline (`engine.record_timeline`): idle time
   over the step's pipeline span, idle being the span minus the time this rank computed. The time
   an action spends blocked in a receive (`StageLink.recv_forward/recv_backward`, timed by wrapping
   them on the engine's link instance) counts as idle. Next to it: the theory ((p-1)/(m+p-1) for
   gpipe and 1f1b, (p-1)/(v m+p-1) interleaved, zb-h1 from `plait.pipeline.simulate` with equal F,
   B and W costs), plait's simulator run with the measured mean F/B/W costs, and a replay of the
   step's own measured action durations under the schedule's true dependencies with instant
   communication (what the schedule alone would cost with these per-stage, per-action costs).
2. fixed-cost stages, p=4 and p=8: on 2 cores, 4-8 ranks that compute would measure core
   contention, not the schedule. plait's `tiny` GPT gets one layer per virtual stage, and every
   layer sleeps instead of computing: a forward pre-hook sleeps t_f/v, an autograd Function on the
   layer's input sleeps t_f/v in the input-gradient pass (B) and one on a weight sleeps t_f/v in the
   weight-gradient pass (W), so F:B:W = 1:1:1 (a whole backward 2). Hooks are on the layer
   instances only. Bubbles for m in {4, 8, 16} against the same theory.
3. torch.distributed.pipelining on the part-1 model and split (the same plait stage modules wrapped
   in torch's PipelineStage, same weights, same batches, AdamW on both): tokens/s per schedule,
   alternating plait / torch A B A B; pairs gpipe-ScheduleGPipe, 1f1b-Schedule1F1B,
   interleaved-ScheduleInterleaved1F1B (v=2) and zb-h1-ScheduleInterleavedZeroBubble with one
   stage per rank (torch's ZB1P; it has no single-stage ZB-H1 class).

Timelines of one step per schedule (p=2 real m=8 and p=4 fixed-cost m=8) go to
results/pipeline-timeline-*.png; everything else to results/pipeline.json.

    python benchmarks/pipeline.py                 # the full run (~5.5 min on 2 quiet cores)
    python benchmarks/pipeline.py --quick         # small model, fewer cases (~20 s)
    python benchmarks/pipeline.py --parts sleep   # one part only (real, sleep, torch)
    python benchmarks/pipeline.py --parts torch --merge   # rerun one part, keep the others' JSON
    python benchmarks/pipeline.py --wait-for '[b]in/pytest'   # before each part, wait for the box to be quiet

Each configuration records the 1-minute load average at every step (it counts this run's own ranks).
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import (
    RESULTS_DIR,
    environment,
    format_table,
    load_average,
    ratio_summary,
    run_alternating,
    run_ranks,
    spread,
    timed_block,
    wait_for_quiet,
    write_json,
)

import plait
from plait.models import build
from plait.pipeline import build_schedule, build_stage, layer_costs, partition_layers, simulate

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
PARTS = ("real", "sleep", "torch")
INTERLEAVED_CHUNKS = 2
# plait schedule -> (torch.distributed.pipelining class, model chunks per rank)
TORCH_PEERS = {
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved": ("ScheduleInterleaved1F1B", INTERLEAVED_CHUNKS),
    "zb-h1": ("ScheduleInterleavedZeroBubble", 1),
}
TORCH_SINGLE_STAGE = ("ScheduleGPipe", "Schedule1F1B")  # these take one stage; the rest a list


@dataclass(frozen=True)
class RealConfig:
    """Part 1 (and the model of part 3): a GPT whose stages compute."""

    p: int = 2
    d_model: int = 256
    layers: int = 8
    heads: int = 4
    vocab: int = 8192
    seq: int = 128
    microbatch_size: int = 2  # sequences per micro-batch
    ms: tuple[int, ...] = (4, 8, 16)
    warmup: int = 1
    steps: int = 4
    rank_balanced_interleaved: bool = True  # also run interleaved with a split balanced per rank

    def model_overrides(self) -> dict[str, Any]:
        return {
            "max_seq_len": self.seq,
            "d_model": self.d_model,
            "num_layers": self.layers,
            "num_heads": self.heads,
            "vocab_size": self.vocab,
            "tied_embeddings": False,  # torch's pipelining has no tied-weight sync: untie for both
        }


@dataclass(frozen=True)
class SleepConfig:
    """Part 2: layers that sleep a fixed time per pass instead of computing."""

    ps: tuple[int, ...] = (4, 8)
    ms: tuple[int, ...] = (4, 8, 16)
    forward_ms: float = 20.0  # F of a whole stage; B (input grad) and W (weight grad) the same each
    seq: int = 32
    warmup: int = 1
    steps: int = 3


@dataclass(frozen=True)
class PeerConfig:
    """Part 3: plait against torch.distributed.pipelining, A B A B."""

    m: int = 8
    pairs: int = 5
    steps: int = 2  # timed steps per block
    block_warmup: int = 1  # untimed steps of a system right before each of its blocks


@dataclass(frozen=True)
class BenchConfig:
    real: RealConfig = field(default_factory=RealConfig)
    sleep: SleepConfig = field(default_factory=SleepConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    parts: tuple[str, ...] = PARTS
    plot_m: int = 8
    plot_sleep_p: int = 4
    lr: float = 3e-4
    seed: int = 0
    quick: bool = False
    wait_for: str | None = None  # before each part, wait until no process matches this (pgrep -f)
    merge: bool = False  # keep the parts not run now from the existing JSON


def chunks_of(schedule: str) -> int:
    return INTERLEAVED_CHUNKS if schedule == "interleaved" else 1


def invalid_reason(schedule: str, p: int, m: int) -> str | None:
    """Why plait cannot run `schedule` with p ranks and m micro-batches (None when it can)."""
    try:
        build_schedule(schedule, num_ranks=p, num_microbatches=m, num_chunks=chunks_of(schedule))
    except ValueError as error:
        return str(error).split(":")[0]
    return None


def make_optimizer(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    def optimizer(params):
        return torch.optim.AdamW(params, lr=lr)

    return optimizer


# ---------------------------------------------------------------------------
# Fixed-cost layers (part 2)


class _SleepInInputGrad(torch.autograd.Function):
    """Identity on a layer's input; its backward sleeps (the input-gradient pass, B)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(ctx.seconds)
        return grad, None


class _SleepInWeightGrad(torch.autograd.Function):
    """A zero that depends on a weight only; its backward sleeps (the weight-gradient pass, W)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        ctx.shape = weight.shape
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(ctx.seconds)
        return grad.new_zeros(ctx.shape), None


def make_layers_sleep(model: torch.nn.Module, *, seconds: float) -> None:
    """Every block of plait's GPT sleeps `seconds` in F, in B (input grad) and in W (weight grad).

    B's sleep sits on the block's input, so it runs in a pass that wants the input's gradient (and
    on the first stage, whose input comes from the embedding, in the weight pass: plait's first
    stage has no input gradient to compute and does all its backward in W). W's sleep hangs off a
    weight, so only a pass that wants weight gradients runs it; a whole backward runs both.
    """

    def before(block, args, kwargs):
        time.sleep(seconds)
        if not torch.is_grad_enabled():
            return None
        (x, *rest) = args
        return (_SleepInInputGrad.apply(x, seconds), *rest), kwargs

    def after(block, args, output):
        if not torch.is_grad_enabled():
            return None
        return output + _SleepInWeightGrad.apply(next(block.parameters()), seconds)

    for block in model.blocks:
        block.register_forward_pre_hook(before, with_kwargs=True)
        block.register_forward_hook(after)


# ---------------------------------------------------------------------------
# One rank's side of parts 1 and 2: run plait's pipeline, keep its timelines


class LinkTimer:
    """Wraps a StageLink instance's methods to record when each blocking receive waited and when each
    send was posted (by channel and message key), to time the steps' communication."""

    def __init__(self, link: Any) -> None:
        self.recvs: list[tuple[str, int, float, float]] = []  # (channel, key, start, end)
        self.sends: list[tuple[str, int, float]] = []  # (channel, key, time the isend was posted)
        for channel in ("forward", "backward"):
            setattr(link, f"recv_{channel}", self._timed_recv(channel, getattr(link, f"recv_{channel}")))
            setattr(link, f"send_{channel}", self._timed_send(channel, getattr(link, f"send_{channel}")))

    def clear(self) -> None:
        self.recvs.clear()
        self.sends.clear()

    def _timed_recv(self, channel: str, receive: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def timed(*args: Any, key: int = 0, **kwargs: Any) -> torch.Tensor:
            start = time.perf_counter()
            tensor = receive(*args, key=key, **kwargs)
            self.recvs.append((channel, key, start, time.perf_counter()))
            return tensor

        return timed

    def _timed_send(self, channel: str, send: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, key: int = 0, **kwargs: Any) -> Any:
            works = send(*args, key=key, **kwargs)
            self.sends.append((channel, key, time.perf_counter()))
            return works

        return timed


@dataclass(frozen=True)
class Case:
    part: str  # "real" or "sleep"
    schedule: str
    p: int
    m: int
    v: int
    split: str = "plait"  # "plait": plait's partition_layers; "rank-balanced": see rank_balanced_split

    @property
    def label(self) -> str:
        return self.schedule + ("/rank-bal" if self.split == "rank-balanced" else "")


def build_case_model(case: Case, config: BenchConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    if case.part == "real":
        return build("bench-dp", **config.real.model_overrides())
    model = build("tiny", max_seq_len=config.sleep.seq, num_layers=case.p * case.v, tied_embeddings=False)
    make_layers_sleep(model, seconds=config.sleep.forward_ms / 1000 / case.v)
    return model


def case_batches(case: Case, config: BenchConfig, vocab: int) -> list[torch.Tensor]:
    """The global batches (m micro-batches), the same on every rank (dp=1)."""
    size, seq = (config.real.microbatch_size, config.real.seq) if case.part == "real" else (1, config.sleep.seq)
    gen = torch.Generator().manual_seed(config.seed * 1000 + 7)
    return [torch.randint(0, vocab, (case.m * size, seq), generator=gen) for _ in range(4)]


def rank_balanced_split(model: torch.nn.Module, *, p: int, v: int) -> list[int]:
    """Split points for p*v virtual stages that minimise the busiest rank's summed cost (rank r holds
    virtual stages r, r+p, ...), ties broken by the costliest stage; costs are plait's `layer_costs`
    (the embedding charged to the first layer, the head to the last, as `partition_layers` does).

    plait's `partition_layers` minimises the costliest virtual stage only and, among equal splits,
    gives later stages as many layers as it can, which can leave one rank much more work.
    """
    costs = layer_costs(model, seq_len=model.config.max_seq_len)
    flops = [cost.flops_per_token for cost in costs[1:-1]]
    flops[0] += costs[0].flops_per_token
    flops[-1] += costs[-1].flops_per_token
    best: tuple[tuple[float, float], list[int]] | None = None
    for points in itertools.combinations(range(1, len(flops)), p * v - 1):
        bounds = (0, *points, len(flops))
        stages = [sum(flops[a:b]) for a, b in itertools.pairwise(bounds)]
        key = (max(sum(stages[r::p]) for r in range(p)), max(stages))
        if best is None or key < best[0]:
            best = (key, list(points))
    assert best is not None
    return best[1]


def run_case(rank: int, case: Case, config: BenchConfig) -> dict[str, Any]:
    part = config.real if case.part == "real" else config.sleep
    model = build_case_model(case, config)
    vocab = model.config.vocab_size
    split = rank_balanced_split(model, p=case.p, v=case.v) if case.split == "rank-balanced" else []
    plan = plait.Plan(dp=1, pp=case.p, microbatches=case.m, pp_schedule=case.schedule, pp_chunks=case.v, pp_split=split)
    engine = plait.boost(model, optimizer=make_optimizer(config.lr), loss_fn=plait.losses.causal_lm, plan=plan)
    engine.record_timeline = True
    runner = engine.pipeline.runner
    link = LinkTimer(runner.link)
    batches = case_batches(case, config, vocab)
    steps = []
    for index in range(part.warmup + part.steps):
        tokens = batches[index % len(batches)]
        link.clear()
        dist.barrier()
        load = load_average()
        cpu_start = time.thread_time()
        start = time.perf_counter()
        result = engine.train_step({"input_ids": tokens, "labels": tokens})
        end = time.perf_counter()
        if index < part.warmup:
            continue
        steps.append(
            {
                "t0": start,
                "t1": end,
                "cpu_s": time.thread_time() - cpu_start,
                "load": load,
                "loss": float(result.loss),
                "timeline": [tuple(action) for action in runner.timeline],
                "recvs": list(link.recvs),
                "sends": list(link.sends),
            }
        )
    record = {
        "rank": rank,
        "pp_split": split,
        # whether the last stage ran its whole backward in B (plait's runner before its ZB-H1 fix had no flag)
        "fuse_last_backward": bool(getattr(runner, "fuse_last_backward", True)),
        "stages": [{"virtual_stage": c.spec.index, "layers": list(c.spec.layers)} for c in runner.chunks],
        "steps": steps,
        "tokens_per_step": int(batches[0].numel()),
    }
    del engine, model, runner
    gc.collect()
    dist.barrier()
    return record


def rank_cases(rank: int, world_size: int, cases: list[Case], config: BenchConfig) -> list[dict[str, Any]]:
    torch.manual_seed(config.seed)
    return [run_case(rank, case, config) for case in cases]


# ---------------------------------------------------------------------------
# Timeline analysis (in the parent, pure Python)


def _overlap(start: float, end: float, intervals: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in intervals)


def step_actions(rank_step: dict[str, Any]) -> list[dict[str, Any]]:
    """This rank's actions of one step, each with the time it waited in receives and the time it computed."""
    intervals = [(start, end) for _, _, start, end in rank_step["recvs"]]
    actions = []
    for kind, microbatch, chunk, start, end in rank_step["timeline"]:
        waited = _overlap(start, end, intervals)
        actions.append(
            {"kind": kind, "mb": microbatch, "chunk": chunk, "start": start, "end": end, "wait": waited}
            | {"compute": end - start - waited}
        )
    return actions


def hop_delays(rank_steps: list[dict[str, Any]]) -> list[float]:
    """Per message: the receive's end minus the later of its start and the send's posting, i.e. how long
    delivery took beyond the data dependency (loopback gloo plus waking the receiving process)."""
    posted = {(channel, key): t for step in rank_steps for channel, key, t in step["sends"]}
    return [
        end - max(start, posted[(channel, key)])
        for step in rank_steps
        for channel, key, start, end in step["recvs"]
        if (channel, key) in posted
    ]


def replay(per_rank: list[list[dict[str, Any]]], *, p: int, v: int) -> float:
    """The bubble of these actions (their measured compute times) under true dependencies, instant comm.

    The same rules as `plait.pipeline.simulate`, with every action's own cost: F of stage s needs F of
    s-1; B needs its F and B of s+1; W needs its B. Returns idle / (ranks x makespan).
    """
    num_stages = p * v
    finished: dict[tuple[str, int, int], float] = {}
    position, free = [0] * p, [0.0] * p
    moved = True
    while moved:
        moved = False
        for rank, actions in enumerate(per_rank):
            while position[rank] < len(actions):
                action = actions[position[rank]]
                stage = action["chunk"] * p + rank
                needs = {
                    "F": [("F", stage - 1)] if stage > 0 else [],
                    "B": [("F", stage)] + ([("B", stage + 1)] if stage < num_stages - 1 else []),
                    "W": [("B", stage)],
                }[action["kind"]]
                keys = [(kind, s, action["mb"]) for kind, s in needs]
                if any(key not in finished for key in keys):
                    break
                start = max([free[rank], *(finished[key] for key in keys)])
                free[rank] = start + action["compute"]
                finished[(action["kind"], stage, action["mb"])] = free[rank]
                position[rank] += 1
                moved = True
    if any(position[r] < len(a) for r, a in enumerate(per_rank)):
        raise RuntimeError("replay stuck: the timeline does not follow the schedule's dependencies")
    makespan = max(free)
    busy = sum(a["compute"] for actions in per_rank for a in actions)
    return 1 - busy / (p * makespan)


def analyse_step(rank_steps: list[dict[str, Any]], case: Case) -> dict[str, Any]:
    """One step across all ranks: the pipeline span, each stage's bubble, per-kind costs."""
    per_rank = [step_actions(step) for step in rank_steps]
    span_start = min(a["start"] for actions in per_rank for a in actions)
    span_end = max(a["end"] for actions in per_rank for a in actions)
    span = span_end - span_start
    wall = max(s["t1"] for s in rank_steps) - min(s["t0"] for s in rank_steps)
    computed = [sum(a["compute"] for a in actions) for actions in per_rank]
    in_actions = [sum(a["end"] - a["start"] for a in actions) for actions in per_rank]
    costs: dict[str, list[float]] = {"F": [], "B": [], "W": []}
    for actions in per_rank:
        for action in actions:
            costs[action["kind"]].append(action["compute"])
    return {
        "wall_s": wall,
        "span_s": span,
        "bubble": [1 - c / span for c in computed],
        "bubble_waits_as_busy": [1 - b / span for b in in_actions],  # receive waits counted as work
        "bubble_of_wall": [1 - c / wall for c in computed],  # against the whole train_step
        "replay_bubble": replay(per_rank, p=case.p, v=case.v),
        "hop_delay_ms": statistics.median(hop_delays(rank_steps) or [0.0]) * 1e3,
        "start_skew_s": max(s["t0"] for s in rank_steps) - min(s["t0"] for s in rank_steps),
        "cost_means_s": {k: statistics.fmean(v) for k, v in costs.items() if v},
        "cost_means_by_rank_s": [
            {
                k: statistics.fmean([a["compute"] for a in actions if a["kind"] == k])
                for k in "FBW"
                if k in {a["kind"] for a in actions}
            }
            for actions in per_rank
        ],
        "span_start": span_start,
        "load": rank_steps[0]["load"],
        "cpu_s": [s["cpu_s"] for s in rank_steps],
        "loss": rank_steps[-1]["loss"],
        "actions": [
            [
                {
                    "kind": a["kind"],
                    "mb": a["mb"],
                    "chunk": a["chunk"],
                    "start_ms": round((a["start"] - span_start) * 1e3, 3),
                    "end_ms": round((a["end"] - span_start) * 1e3, 3),
                    "wait_ms": round(a["wait"] * 1e3, 3),
                }
                for a in actions
            ]
            for actions in per_rank
        ],
    }


def theory_bubble(schedule: str, p: int, m: int, v: int) -> tuple[float, str]:
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1), "(p-1)/(m+p-1)"
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1), "(p-1)/(vm+p-1)"
    sim = simulate(
        build_schedule(schedule, num_ranks=p, num_microbatches=m), forward_cost=1, backward_cost=2, weight_cost=1
    )
    return sim.bubble_fraction, "simulate, F=B=W"


def simulated_bubble(case: Case, costs: dict[str, float]) -> float:
    """plait's simulator with the measured mean per-action costs."""
    schedule = build_schedule(case.schedule, num_ranks=case.p, num_microbatches=case.m, num_chunks=case.v)
    weight = costs.get("W")
    backward = costs["B"] + (weight or 0.0)
    return simulate(schedule, forward_cost=costs["F"], backward_cost=backward, weight_cost=weight).bubble_fraction


def summarize_case(case: Case, records: list[dict[str, Any]]) -> dict[str, Any]:
    num_steps = len(records[0]["steps"])
    steps = [analyse_step([r["steps"][i] for r in records], case) for i in range(num_steps)]
    tokens = records[0]["tokens_per_step"]
    rates = [tokens / s["wall_s"] for s in steps]
    median_index = sorted(range(num_steps), key=lambda i: steps[i]["wall_s"])[num_steps // 2]
    costs = {k: statistics.median(s["cost_means_s"][k] for s in steps) for k in steps[0]["cost_means_s"]}
    theory, formula = theory_bubble(case.schedule, case.p, case.m, case.v)
    per_stage = [statistics.median(s["bubble"][r] for s in steps) for r in range(case.p)]
    return {
        **asdict(case),
        "label": case.label,
        "tokens_per_step": tokens,
        "tokens_per_s": spread(rates),
        "step_s": spread([s["wall_s"] for s in steps]),
        "span_s": spread([s["span_s"] for s in steps]),
        "bubble_per_stage": per_stage,
        "bubble_mean": statistics.median(statistics.fmean(s["bubble"]) for s in steps),
        "bubble_mean_waits_as_busy": statistics.median(statistics.fmean(s["bubble_waits_as_busy"]) for s in steps),
        "bubble_mean_of_wall": statistics.median(statistics.fmean(s["bubble_of_wall"]) for s in steps),
        "theory": theory,
        "theory_formula": formula,
        "simulated_measured_costs": simulated_bubble(case, costs),
        "replay": statistics.median(s["replay_bubble"] for s in steps),
        "hop_delay_ms_median": statistics.median(s["hop_delay_ms"] for s in steps),
        "cost_means_ms": {k: c * 1e3 for k, c in costs.items()},
        "cost_means_by_rank_ms": [
            {k: c * 1e3 for k, c in d.items()} for d in steps[median_index]["cost_means_by_rank_s"]
        ],
        "load": [s["load"] for s in steps],
        "cpu_share": [[c / s["wall_s"] for c in s["cpu_s"]] for s in steps],
        "start_skew_ms_max": max(s["start_skew_s"] for s in steps) * 1e3,
        "stages": [r["stages"] for r in records],
        "pp_split": records[0]["pp_split"],
        "fuse_last_backward": records[-1]["fuse_last_backward"],
        "losses": [s["loss"] for s in steps],
        "plotted_step": median_index,
        "steps": [{k: v for k, v in s.items() if k not in ("span_start", "cost_means_by_rank_s")} for s in steps],
    }


def run_timeline_cases(part: str, p: int, ms: tuple[int, ...], config: BenchConfig, timeout_s: float) -> dict[str, Any]:
    cases, skipped = [], []
    for schedule in SCHEDULES:
        for m in ms:
            reason = invalid_reason(schedule, p, m)
            if reason:
                skipped.append({"schedule": schedule, "p": p, "m": m, "reason": reason})
            else:
                cases.append(Case(part, schedule, p, m, chunks_of(schedule)))
        if part == "real" and schedule == "interleaved" and config.real.rank_balanced_interleaved:
            cases += [
                Case(part, schedule, p, m, chunks_of(schedule), "rank-balanced")
                for m in ms
                if not invalid_reason(schedule, p, m)
            ]
    waited = wait_for_quiet(config.wait_for) if config.wait_for else None
    print(f"[{part}] p={p}: {len(cases)} cases, load {load_average()}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    load_start = load_average()
    results = run_ranks(rank_cases, p, cases, config, num_threads=1, timeout_s=timeout_s)
    summaries = [summarize_case(case, [results[r][i] for r in range(p)]) for i, case in enumerate(cases)]
    return {
        "p": p,
        "cases": summaries,
        "skipped": skipped,
        "wall_s": time.perf_counter() - started,
        "load_start": load_start,
        "load_end": load_average(),
        "waited_for_quiet": waited,
    }


# ---------------------------------------------------------------------------
# Part 3: torch.distributed.pipelining, A B A B


def torch_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one micro-batch (plait's causal_lm over its token count)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target[:, 1:].reshape(-1))


class PlaitSystem:
    def __init__(self, model: torch.nn.Module, schedule: str, m: int, p: int, lr: float) -> None:
        self.engine = plait.boost(
            model,
            optimizer=make_optimizer(lr),
            loss_fn=plait.losses.causal_lm,
            plan=plait.Plan(dp=1, pp=p, microbatches=m, pp_schedule=schedule, pp_chunks=chunks_of(schedule)),
        )
        self.losses: list[float] = []

    def step(self, tokens: torch.Tensor) -> None:
        self.losses.append(float(self.engine.train_step({"input_ids": tokens, "labels": tokens}).loss))


class TorchSystem:
    """torch's PipelineStage around plait's stage modules (the same split), its schedule, AdamW."""

    def __init__(self, model: torch.nn.Module, schedule: str, m: int, rank: int, p: int, lr: float) -> None:
        from torch.distributed import pipelining

        class_name, v = TORCH_PEERS[schedule]
        num_stages = p * v
        ranges = partition_layers(model, pp=p, seq_len=model.config.max_seq_len, num_chunks=v)
        self.indices = [c * p + rank for c in range(v)]
        modules = [build_stage(model, stage_index=i, num_stages=num_stages, layer_ranges=ranges) for i in self.indices]
        stages = [
            pipelining.PipelineStage(mod, i, num_stages, torch.device("cpu"))
            for mod, i in zip(modules, self.indices, strict=True)
        ]
        schedule_class = getattr(pipelining, class_name)
        self.schedule = schedule_class(stages[0] if class_name in TORCH_SINGLE_STAGE else stages, m, loss_fn=torch_loss)
        params = [param for mod in modules for param in mod.parameters()]
        self.optimizer = make_optimizer(lr)(params)
        self.first = 0 in self.indices
        self.last = num_stages - 1 in self.indices
        self.losses: list[float] = []

    def step(self, tokens: torch.Tensor) -> None:
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.first else ()
        self.schedule.step(*args, target=tokens if self.last else None, losses=losses, return_outputs=False)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.last:
            self.losses.append(float(torch.stack(losses).detach().mean()))


class Alternation:
    """The two systems of one schedule, each walking the shared batches, timed block by block."""

    def __init__(self, systems: dict[str, Any], batches: list[torch.Tensor], peer: PeerConfig) -> None:
        self.systems = systems
        self.batches = batches
        self.peer = peer
        self.counter = dict.fromkeys(systems, 0)
        self.loads: dict[str, list[float | None]] = {name: [] for name in systems}

    def steps(self, name: str, count: int) -> None:
        for _ in range(count):
            self.systems[name].step(self.batches[self.counter[name] % len(self.batches)])
            self.counter[name] += 1

    def block(self, name: str) -> float:
        self.steps(name, self.peer.block_warmup)
        self.loads[name].append(load_average())
        seconds, _ = timed_block(lambda: self.steps(name, self.peer.steps))
        return seconds


def compare_schedule(
    schedule: str, rank: int, world_size: int, config: BenchConfig, batches: list[torch.Tensor]
) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    model = build("bench-dp", **config.real.model_overrides())
    reference = copy.deepcopy(model)  # the same initial weights for both
    try:
        systems = {
            "plait": PlaitSystem(model, schedule, config.peer.m, world_size, config.lr),
            "torch": TorchSystem(reference, schedule, config.peer.m, rank, world_size, config.lr),
        }
    except Exception as error:  # say which schedule does not run, and why
        return {"error": f"{type(error).__name__}: {error}"[:800]}
    runs = Alternation(systems, batches, config.peer)
    first_loss = {}
    for name, system in systems.items():  # one step each on the same first batch: the same loss
        runs.steps(name, 1)
        first_loss[name] = system.losses[-1] if system.losses else None
    try:
        timing = run_alternating(
            {name: (lambda name=name: runs.block(name)) for name in systems}, num_pairs=config.peer.pairs
        )
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"[:800]}
    return {"timing": timing, "first_loss": first_loss, "load": runs.loads, "torch_class": TORCH_PEERS[schedule][0]}


def rank_peer(rank: int, world_size: int, config: BenchConfig) -> dict[str, Any]:
    real, peer = config.real, config.peer
    gen = torch.Generator().manual_seed(config.seed * 1000 + 11)
    batches = [torch.randint(0, real.vocab, (peer.m * real.microbatch_size, real.seq), generator=gen) for _ in range(4)]
    out: dict[str, Any] = {}
    for schedule in SCHEDULES:
        out[schedule] = compare_schedule(schedule, rank, world_size, config, batches)
        gc.collect()
        dist.barrier()
    return out


def run_peer(config: BenchConfig, timeout_s: float) -> dict[str, Any]:
    real, peer = config.real, config.peer
    waited = wait_for_quiet(config.wait_for) if config.wait_for else None
    print(f"[torch] p={real.p} m={peer.m}: {peer.pairs} pairs, load {load_average()}", file=sys.stderr, flush=True)
    load_start = load_average()
    started = time.perf_counter()
    results = run_ranks(rank_peer, real.p, config, num_threads=1, timeout_s=timeout_s)
    tokens = peer.m * real.microbatch_size * real.seq * peer.steps
    rows = {}
    for schedule in SCHEDULES:
        lead = results[0][schedule]
        if "error" in lead:
            rows[schedule] = {"torch_class": TORCH_PEERS[schedule][0], "error": lead["error"]}
            continue
        seconds = lead["timing"]["seconds"]
        rates = {name: [tokens / s for s in seconds[name]] for name in seconds}
        rows[schedule] = {
            "torch_class": lead["torch_class"],
            "tokens_per_s": {name: spread(r) for name, r in rates.items()},
            "tokens_per_s_per_block": rates,
            "ratio_plait_over_torch": ratio_summary(rates["plait"], rates["torch"]),
            "orders": lead["timing"]["orders"],
            "first_step_loss": {
                "plait": lead["first_loss"]["plait"],
                "torch": results[-1][schedule]["first_loss"]["torch"],
            },
            "load": lead["load"],
        }
    return {
        "m": peer.m,
        "schedules": rows,
        "wall_s": time.perf_counter() - started,
        "load_start": load_start,
        "load_end": load_average(),
        "waited_for_quiet": waited,
    }


# ---------------------------------------------------------------------------
# Plots

COLOURS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868"}


def plot_timelines(path: Path, title: str, cases: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    p = cases[0]["p"]
    longest = max(c["steps"][c["plotted_step"]]["span_s"] for c in cases) * 1e3
    fig, axes = plt.subplots(len(cases), 1, figsize=(15, 0.9 + (0.42 * p + 0.75) * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases, strict=True):
        step = case["steps"][case["plotted_step"]]
        for rank, actions in enumerate(step["actions"]):
            for a in actions:
                if a["wait_ms"] > 0.05:  # blocked in a receive: drawn as a thin grey bar
                    ax.barh(rank, a["wait_ms"], left=a["start_ms"], height=0.18, color="#999999")
                left = a["start_ms"] + a["wait_ms"]
                width = max(a["end_ms"] - left, 0.0)
                shade = 1.0 if a["chunk"] == 0 else 0.55
                ax.barh(
                    rank,
                    width,
                    left=left,
                    height=0.8,
                    color=COLOURS[a["kind"]],
                    alpha=shade,
                    edgecolor="black",
                    linewidth=0.4,
                )
                if width > longest / 90:
                    label = str(a["mb"]) + ("'" if a["chunk"] else "")
                    ax.text(left + width / 2, rank, label, ha="center", va="center", fontsize=6.5)
        ax.set_yticks(range(p), [f"stage {r}" for r in range(p)])
        ax.set_ylim(p - 0.5, -0.5)
        ax.set_xlim(0, longest * 1.01)
        measured = ", ".join(f"{b:.0%}" for b in step["bubble"])
        ax.set_title(
            f"{case['schedule']}{' (v=2)' if case['v'] > 1 else ''}{', split balanced per rank' if case['split'] != 'plait' else ''}, m={case['m']}: bubble per stage {measured} "
            f"(mean {statistics.fmean(step['bubble']):.1%}) | theory {case['theory']:.1%} ({case['theory_formula']}) | "
            f"replay of measured costs {step['replay_bubble']:.1%} | span {step['span_s'] * 1e3:.0f} ms",
            fontsize=9,
            loc="left",
        )
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms since the step's first action")
    handles = [
        Patch(color=COLOURS[k], label=label)
        for k, label in (("F", "F forward"), ("B", "B backward (input grad only in zb-h1)"), ("W", "W weight grad"))
    ]
    handles += [
        Patch(color="#999999", label="blocked in a receive"),
        Patch(color=COLOURS["F"], alpha=0.55, label="second chunk (n')"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Tables


def pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def timeline_table(cases: list[dict[str, Any]], *, with_rate: bool) -> str:
    rows = []
    for c in cases:
        costs = c["cost_means_ms"]
        row = [
            c["label"],
            str(c["p"]),
            str(c["m"]),
        ]
        if with_rate:
            rate = c["tokens_per_s"]
            row += [f"{rate['median']:.0f}", f"{rate['min']:.0f}-{rate['max']:.0f}"]
        row += [
            f"{c['step_s']['median'] * 1e3:.0f}",
            " ".join(f"{b * 100:.0f}" for b in c["bubble_per_stage"]),
            pct(c["bubble_mean"]),
            pct(c["theory"]),
            pct(c["simulated_measured_costs"]),
            pct(c["replay"]),
            pct(c["bubble_mean_waits_as_busy"]),
            f"{c['hop_delay_ms_median']:.2f}",
            "/".join(f"{costs[k]:.1f}" for k in "FBW" if k in costs),
            f"{min(x for x in c['load'] if x is not None):.1f}-{max(x for x in c['load'] if x is not None):.1f}",
        ]
        rows.append(row)
    headers = ["schedule", "p", "m"]
    if with_rate:
        headers += ["tokens/s", "min-max"]
    headers += [
        "step ms",
        "bubble/stage %",
        "measured",
        "theory",
        "sim(costs)",
        "replay",
        "waits busy",
        "hop ms",
        "F/B/W ms",
        "load",
    ]
    return format_table(headers, rows)


def zb_h1_split_effect(pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """ZB-H1's bubble with equal F/B/W costs, against other splits of the backward over B and W.

    plait's first stage, having no input gradient to compute, runs its whole backward in W (B is
    empty). A last stage that runs its whole backward in B (W empty; plait does so under tensor
    parallel, whose in-place vocab-parallel cross entropy allows one backward pass, and did so always
    before its ZB-H1 fix) lengthens the backward chain. Replayed with unit costs under the schedule's
    dependencies: each split alone, and both.
    """
    rows = []
    for p, m in pairs:
        schedule = build_schedule("zb-h1", num_ranks=p, num_microbatches=m)

        def bubble(first: bool, last: bool, schedule=schedule, p=p) -> float:
            per_rank = []
            for rank in range(p):
                cost = {"F": 1.0, "B": 1.0, "W": 1.0}
                if first and rank == 0:
                    cost = {"F": 1.0, "B": 0.0, "W": 2.0}
                if last and rank == p - 1:
                    cost = {"F": 1.0, "B": 2.0, "W": 0.0}
                acts = schedule.actions(rank)
                per_rank.append(
                    [{"kind": a.kind, "mb": a.microbatch, "chunk": 0, "compute": cost[a.kind]} for a in acts]
                )
            return replay(per_rank, p=p, v=1)

        rows.append(
            {
                "p": p,
                "m": m,
                "1f1b_theory": (p - 1) / (m + p - 1),
                "zb_h1_equal_costs": bubble(False, False),
                "first_stage_all_in_W": bubble(True, False),
                "last_stage_all_in_B": bubble(False, True),
                "plait_both": bubble(True, True),
            }
        )
    return rows


def zb_table(rows: list[dict[str, Any]]) -> str:
    headers = ["p", "m", "1f1b theory", "zb-h1 F=B=W", "first stage B=0,W=2", "last stage B=2,W=0", "both"]
    keys = ["1f1b_theory", "zb_h1_equal_costs", "first_stage_all_in_W", "last_stage_all_in_B", "plait_both"]
    return format_table(headers, [[str(r["p"]), str(r["m"]), *(pct(r[k]) for k in keys)] for r in rows])


def split_cost_rows(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rank and m: zb-h1's measured B and W against 1f1b's whole backward (same model, same stage)."""
    whole = {
        (c["m"], r): costs["B"]
        for c in cases
        if c["label"] == "1f1b"
        for r, costs in enumerate(c["cost_means_by_rank_ms"])
    }
    rows = []
    for c in cases:
        if c["label"] != "zb-h1":
            continue
        for rank, costs in enumerate(c["cost_means_by_rank_ms"]):
            split = costs["B"] + costs["W"]
            reference = whole.get((c["m"], rank))
            rows.append(
                {"m": c["m"], "stage": rank, "B_ms": costs["B"], "W_ms": costs["W"], "B_plus_W_ms": split}
                | {"1f1b_B_ms": reference, "ratio": split / reference if reference else None}
            )
    return rows


def split_cost_table(rows: list[dict[str, Any]]) -> str:
    headers = ["m", "stage", "zb-h1 B ms", "zb-h1 W ms", "B+W ms", "1f1b B ms", "(B+W)/1f1b B"]
    return format_table(
        headers,
        [
            [str(r["m"]), str(r["stage"]), f"{r['B_ms']:.1f}", f"{r['W_ms']:.1f}", f"{r['B_plus_W_ms']:.1f}"]
            + ([f"{r['1f1b_B_ms']:.1f}", f"{r['ratio']:.2f}"] if r["ratio"] else ["-", "-"])
            for r in rows
        ],
    )


def peer_table(peer: dict[str, Any]) -> str:
    rows = []
    for schedule, row in peer["schedules"].items():
        if "error" in row:
            rows.append([schedule, row["torch_class"], "-", "-", "-", "-", row["error"][:60]])
            continue
        rates, ratio = row["tokens_per_s"], row["ratio_plait_over_torch"]
        loss = row["first_step_loss"]
        rows.append(
            [
                schedule,
                row["torch_class"],
                f"{rates['plait']['median']:.0f}",
                f"{rates['torch']['median']:.0f}",
                f"{ratio['median']:.3f}",
                f"{ratio['min']:.3f}-{ratio['max']:.3f}",
                f"{loss['plait']:.4f} / {loss['torch']:.4f}",
            ]
        )
    headers = ["plait", "torch peer", "plait tok/s", "torch tok/s", "ratio", "min-max", "1st loss plait/torch"]
    return format_table(headers, rows)


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, Path, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model and fewer cases (~1 min)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (parts 1 and 2)")
    parser.add_argument("--pairs", type=int, default=None, help="A/B pairs against torch (default 5)")
    parser.add_argument("--sleep-ms", type=float, default=None, help="part 2: F of one stage in ms (default 20)")
    parser.add_argument(
        "--wait-for", default=None, help="before each part, wait until no process matches this pgrep -f pattern"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/pipeline.json)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before ranks count as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the parts not run now from the existing JSON (to rerun one part that the box's load spoiled)",
    )
    args = parser.parse_args(argv)
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes a comma-separated subset of {', '.join(PARTS)}")
    config = BenchConfig(parts=parts, seed=args.seed, quick=args.quick, wait_for=args.wait_for, merge=args.merge)
    if args.quick:
        config = replace(
            config,
            real=RealConfig(d_model=128, layers=4, heads=4, vocab=2048, seq=64, ms=(4, 8), steps=2),
            sleep=SleepConfig(ps=(4,), ms=(8,), forward_ms=5.0, steps=2),
            peer=PeerConfig(m=8, pairs=2, steps=1),
        )
    if args.steps is not None:
        config = replace(
            config, real=replace(config.real, steps=args.steps), sleep=replace(config.sleep, steps=args.steps)
        )
    if args.pairs is not None:
        config = replace(config, peer=replace(config.peer, pairs=args.pairs))
    if args.sleep_ms is not None:
        config = replace(config, sleep=replace(config.sleep, forward_ms=args.sleep_ms))
    default = "pipeline-quick.json" if args.quick else "pipeline.json"
    return config, args.out or RESULTS_DIR / default, args.timeout


def merge_previous(payload: dict[str, Any], previous: dict[str, Any], config: BenchConfig) -> None:
    """Carry the parts not run now over from `previous` (an earlier run's JSON), with that run's records."""
    kept = [part for part in PARTS if part not in config.parts and part in previous]
    for part in kept:
        payload[part] = previous[part]
    earlier = previous.get("runs") or [
        {
            key: previous.get(key)
            for key in ("config", "environment", "load_average_start", "load_average_end", "wall_s")
        }
        | {"parts": [part for part in PARTS if part in previous]}
    ]
    payload["runs"] = earlier + payload["runs"]
    payload["parts_from_earlier_runs"] = kept
    payload["pngs"] = [png for png in previous.get("pngs", []) if any(f"-{part}-" in png for part in kept)]


def main(argv: list[str] | None = None) -> int:
    config, out_path, timeout_s = parse_args(argv)
    started = time.perf_counter()
    suffix = "quick-" if config.quick else ""
    payload: dict[str, Any] = {
        "benchmark": "pipeline",
        "config": asdict(config),
        "environment": environment(),
        "load_average_start": load_average(),
        "notes": {
            "bubble": (
                "per stage: 1 - (time this rank computed) / (the step's pipeline span: first action start to last "
                "action end over all ranks); time blocked in recv_forward/recv_backward counts as idle. "
                "'waits busy': the same with receive waits counted as work (plait's raw timeline)."
            ),
            "theory": "gpipe/1f1b (p-1)/(m+p-1); interleaved (p-1)/(v m+p-1); zb-h1 simulate(F=1,B=1,W=1)",
            "sim(costs)": "plait.pipeline.simulate with the measured mean F/B/W compute per action (all ranks)",
            "replay": "every action's measured compute time, replayed under true dependencies with instant comm",
            "clock": "time.perf_counter is CLOCK_MONOTONIC on Linux: one clock for all forked ranks",
        },
    }
    tables: dict[str, str] = {}
    pngs: list[str] = []
    if "real" in config.parts:
        real = run_timeline_cases("real", config.real.p, config.real.ms, config, timeout_s)
        payload["real"] = real
        real["zb_h1_split_cost"] = split_cost_rows(real["cases"])
        plotted = [c for c in real["cases"] if c["m"] == config.plot_m]
        if plotted:
            r = config.real
            title = (
                f"plait pipeline, real layers: GPT d_model {r.d_model}, {r.layers} layers, vocab {r.vocab}, seq {r.seq}; "
                f"p={r.p} ranks x 1 thread (gloo, CPU), m={config.plot_m} micro-batches of {r.microbatch_size} sequence(s); "
                "one step (the median) per schedule"
            )
            path = RESULTS_DIR / f"pipeline-timeline-{suffix}real-p{r.p}-m{config.plot_m}.png"
            pngs.append(str(plot_timelines(path, title, plotted)))
    if "sleep" in config.parts:
        payload["sleep"] = [run_timeline_cases("sleep", p, config.sleep.ms, config, timeout_s) for p in config.sleep.ps]
        cases = [c for run in payload["sleep"] for c in run["cases"]]
        plotted = [c for c in cases if c["m"] == config.plot_m and c["p"] == config.plot_sleep_p]
        if plotted:
            s = config.sleep
            title = (
                f"plait pipeline, fixed-cost stages: every stage sleeps F = B = W = {s.forward_ms:g} ms per micro-batch "
                f"(v=2: {s.forward_ms / 2:g} ms per chunk); p={config.plot_sleep_p}, m={config.plot_m}; one step (the median)"
            )
            path = RESULTS_DIR / f"pipeline-timeline-{suffix}sleep-p{config.plot_sleep_p}-m{config.plot_m}.png"
            pngs.append(str(plot_timelines(path, title, plotted)))
    if "torch" in config.parts:
        payload["torch"] = run_peer(config, timeout_s)
    payload["load_average_end"] = load_average()
    payload["wall_s"] = time.perf_counter() - started
    run_record = {
        "parts": list(config.parts),
        "config": asdict(config),
        "environment": payload["environment"],
        "load_average_start": payload["load_average_start"],
        "load_average_end": payload["load_average_end"],
        "wall_s": payload["wall_s"],
    }
    payload["runs"] = [run_record]
    if config.merge and out_path.exists():
        merge_previous(payload, json.loads(out_path.read_text()), config)
        pngs = payload["pngs"] + [png for png in pngs if png not in payload["pngs"]]
    if "real" in payload:
        tables["real"] = timeline_table(payload["real"]["cases"], with_rate=True)
        if payload["real"].get("zb_h1_split_cost"):
            tables["split"] = split_cost_table(payload["real"]["zb_h1_split_cost"])
    if "sleep" in payload:
        tables["sleep"] = timeline_table([c for run in payload["sleep"] for c in run["cases"]], with_rate=False)
    zb_pairs = sorted(
        {
            (c["p"], c["m"])
            for run in [payload.get("real"), *payload.get("sleep", [])]
            if run
            for c in run["cases"]
            if c["schedule"] == "zb-h1"
        }
    )
    if zb_pairs:
        payload["zb_h1_split_effect"] = zb_h1_split_effect(zb_pairs)
        tables["zb"] = zb_table(payload["zb_h1_split_effect"])
    if "torch" in payload:
        tables["torch"] = peer_table(payload["torch"])
    payload["tables"] = tables
    payload["pngs"] = pngs

    titles = {
        "real": f"1. real layers, p={config.real.p}: tokens/s and bubble (measured vs theory)",
        "sleep": "2. fixed-cost (sleeping) stages: bubble (measured vs theory)",
        "split": "1b. real layers: what zb-h1's B/W split costs per stage, against 1f1b's whole backward (mean ms)",
        "zb": "2b. zb-h1 with unit costs (analysis, not a measurement): what each B/W split of a stage costs",
        "torch": f"3. plait vs torch.distributed.pipelining, p={config.real.p}, m={config.peer.m}, A B A B x {config.peer.pairs}",
    }
    for name, table in tables.items():
        print(f"\n{titles[name]}\n{table}")
    for run in [payload.get("real"), *payload.get("sleep", [])]:
        if run and run["skipped"]:
            print(f"skipped (p={run['p']}): " + "; ".join(f"{s['schedule']} m={s['m']}" for s in run["skipped"]))
    zb_cases = [c for run in [payload.get("real"), *payload.get("sleep", [])] if run for c in run["cases"]]
    fused = sorted({c["fuse_last_backward"] for c in zb_cases if c["schedule"] == "zb-h1"})
    if fused:
        print(f"zb-h1: the last stage ran its whole backward in B (no B/W split there): {' / '.join(map(str, fused))}")
    print(
        f"\nload average: start {payload['load_average_start']}, end {payload['load_average_end']}; wall {payload['wall_s']:.0f} s"
    )
    for png in pngs:
        print(f"wrote {png}")
    print(f"wrote {write_json(out_path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
