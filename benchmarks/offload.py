"""plait offload to host memory and disk: a 4B model in a 20 GiB job, overlap, the host optimizer, DeepSpeed.

Every training job runs as its own process tree (2 forked gloo ranks of one
thread each, fp32, AdamW, random tokens seeded per rank and step) inside a
fresh cgroup v1 memory group capped at --cap-gib for the whole job
(offload_system.run_capped; the cgroup's peak, page cache included, is the
memory figure). Offload files go under --offload-root, one directory per job,
removed after it. Parts (--only, default all):

- big: a GPT of >= 4B parameters (d_model 3072, 24 heads, vocab 8192, seq
  256; as many layers as reach 4B, fewer if the free disk would keep < 10 GB
  free, said) trains --big-steps steps of 1,024 tokens (4 x 256, 2 per rank)
  with params, gradients and optimizer state all on disk (ZeRO-3, lazy
  init). Per step: time, tokens/s, loss, disk bytes read/written.
- overlap: a model whose states are 2x plan.memory_budget (auto placement)
  against the same model without offload (its compute time) and the I/O
  time its measured disk bytes take at dd's bandwidth; target step <= 1.3 x
  max(compute, I/O).
- optimizer: plait's offloaded optimizer phase (dp=1, zero=1,
  offload_optimizer="cpu", one thread) in parameters/s against torch
  AdamW(fused=True) and DeepSpeedCPUAdam on one flat tensor as large.
- peer: DeepSpeed ZeRO-3 with offload_optimizer and offload_param on cpu
  (DeepSpeedCPUAdam) at the largest size of a coarse search that fits the
  cap, then plait (all states on the cpu tier) at that size, alternated.
- sweep: step time vs model size for plait's cpu and disk tiers, from 0.25x
  the cap up to 2x (the big run is the largest the disk holds).

    python benchmarks/offload.py                    # everything (~2 h on 2 cores)
    python benchmarks/offload.py --quick            # tiny sizes, the harness end to end (~3 min)
    python benchmarks/offload.py --only big         # one part; results merge into the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, environment, format_bytes, format_table, write_json
from offload_system import dd_bandwidth, free_disk_bytes, run_capped

from plait.models import GPTConfig

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
PARTS = ("big", "overlap", "optimizer", "peer", "sweep")
STATE_BYTES_PER_PARAM = 16  # fp32 AdamW: params (the master, aliased) 4 + moments 8 + gradients 4
DISK_HEADROOM = 1.05  # plait pads files and asks for this much over the exact bytes
GB = 1e9
# For every job, plait's and DeepSpeed's alike: glibc's adaptive mmap threshold otherwise keeps the
# memory freed by lazy init in its heap (about 4 bytes a parameter per rank here, counted by the cap).
JOB_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
OVERLAP_TARGET = 1.3
OPTIMIZER_TARGET = 0.95
PEER_TARGET = 1.1


@dataclass
class Settings:
    quick: bool
    cap_bytes: int
    offload_root: Path
    keep_free_bytes: int
    workdir: Path
    big_steps: int
    big_layers: int | None
    peer_pairs: int = 2
    optimizer_rounds: int = 10
    sweep_multiples: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    dd: dict[str, Any] | None = None


def shape(d_model: int, num_layers: int, *, heads: int, vocab: int = 8192, seq: int = 256) -> dict[str, int]:
    return {"vocab_size": vocab, "max_seq_len": seq, "d_model": d_model, "num_layers": num_layers, "num_heads": heads}


def num_params(model: dict[str, int]) -> int:
    return GPTConfig(**model).num_parameters()


def layers_for(target_params: float, *, d_model: int, heads: int, vocab: int, seq: int) -> int:
    """The fewest layers that reach `target_params` at this width."""
    layers = 1
    while num_params(shape(d_model, layers, heads=heads, vocab=vocab, seq=seq)) < target_params:
        layers += 1
    return layers


# ---------------------------------------------------------------------------
# Jobs


def run_job(name: str, spec: dict[str, Any], settings: Settings, *, system: str = "plait") -> dict[str, Any]:
    """One capped job; its result JSON with the cgroup's record under "job" (and "error" if it failed)."""
    spec = {"seed": 0, "world": 2, "threads": 1, "timeout_s": 4 * 3600, **spec}
    offload_dir = None
    if spec.get("kind") == "train" and system == "plait" and needs_dir(spec["plan"]):
        offload_dir = settings.offload_root / f"plait-offload-bench-{name}-{uuid.uuid4().hex[:6]}"
        offload_dir.mkdir(parents=True)
        spec["plan"] = {**spec["plan"], "offload_dir": str(offload_dir)}
    spec_path, out_path = settings.workdir / f"{name}.spec.json", settings.workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    if system == "plait":
        command = [PYTHON, str(HERE / "offload_jobs.py"), str(spec_path), str(out_path)]
    else:
        port = str(29500 + os.getpid() % 1000)
        torchrun = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(spec["world"])]
        command = [*torchrun, "--master_port", port, str(HERE / "offload_peers.py"), str(spec_path), str(out_path)]
    print(f"[{time.strftime('%H:%M:%S')}] job {name}: {describe_spec(spec, system)}", flush=True)
    try:
        job = run_capped(
            command,
            limit_bytes=settings.cap_bytes,
            log_path=settings.workdir / f"{name}.log",
            timeout_s=spec["timeout_s"],
            env={**os.environ, **JOB_ENV},
        )
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
    result = json.loads(out_path.read_text()) if out_path.exists() and job.returncode == 0 else {"spec": spec}
    result["job"] = job.as_dict()
    result["system"] = system
    if job.returncode != 0:
        result["error"] = failure_text(job)
    print(f"    -> {job_line(result)}", flush=True)
    return result


def needs_dir(plan: dict[str, Any]) -> bool:
    tiers = [plan.get(f"offload_{s}", "none") for s in ("optimizer", "gradients", "params")]
    return "disk" in tiers or "auto" in tiers or bool(plan.get("memory_budget"))


def describe_spec(spec: dict[str, Any], system: str) -> str:
    if spec.get("kind") != "train":
        return f"{spec.get('kind')} ({num_params(spec['model']) / 1e6:.0f}M params)"
    plan = spec.get("plan", {})
    where = ", ".join(f"{k}={v}" for k, v in plan.items() if k != "offload_dir") or str(spec.get("deepspeed"))
    tokens = spec["world"] * spec["batch"] * spec["seq"]
    return f"{system}, {num_params(spec['model']) / 1e9:.2f}B params, {tokens} tokens/step, {where}"


def failure_text(job: Any) -> str:
    """The job's exit and the last lines of its log that say why."""
    try:
        lines = Path(job.log).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    useful = [line for line in lines if "Warning" not in line and "return func" not in line]
    why = "OOM-killed at the cgroup cap" if job.oom_kills else f"exit code {job.returncode}"
    return why + (f" ({job.note})" if job.note else "") + "; log tail:\n" + "\n".join(useful[-15:])


def job_line(result: dict[str, Any]) -> str:
    job = result["job"]
    peak = format_bytes(job["peak_bytes"]) if job["peak_bytes"] else "n/a"
    if "error" in result:
        return f"FAILED ({result['error'].splitlines()[0]}), {job['wall_s']:.0f} s, cgroup peak {peak}"
    summary = summarize(result) if result.get("ranks") else {}
    step = summary.get("step_s")
    return f"ok, {job['wall_s']:.0f} s, cgroup peak {peak}" + (f", step {step:.2f} s" if step else "")


# ---------------------------------------------------------------------------
# Summaries of a training job


def steady(steps: list[dict[str, Any]], skip: int) -> list[dict[str, Any]]:
    """Steady-state steps: after the first `skip` (at least one step is kept)."""
    return steps[min(skip, len(steps) - 1) :]


def per_step_io(ranks: list[dict[str, Any]], index: int) -> dict[str, float]:
    """Disk bytes and I/O seconds of step `index`, summed over ranks (they share one disk)."""
    stats = [rank["steps"][index].get("offload") or {} for rank in ranks]
    return {
        "read_bytes": sum(s.get("read_bytes", 0) for s in stats),
        "write_bytes": sum(s.get("write_bytes", 0) for s in stats),
        "io_busy_s": max((s.get("io_busy_s", 0.0) for s in stats), default=0.0),
        "io_wait_s": max((s.get("io_wait_s", 0.0) for s in stats), default=0.0),
        "hidden_share": min((s.get("hidden_share", 1.0) for s in stats), default=1.0),
        "optimizer_s": max((s.get("optimizer_s", 0.0) for s in stats), default=0.0),
    }


def summarize(result: dict[str, Any], *, skip: int = 1) -> dict[str, Any]:
    """Median steady step time, tokens/s, losses, disk traffic per step and peak memory of one job."""
    spec, ranks = result["spec"], result["ranks"]
    steps = ranks[0]["steps"]
    tokens = spec["world"] * spec["batch"] * spec["seq"]
    kept = range(min(skip, len(steps) - 1), len(steps))
    step_s = statistics.median(steps[i]["step_s"] for i in kept)
    io = [per_step_io(ranks, i) for i in range(len(steps))]
    steady_io = {key: statistics.median(io[i][key] for i in kept) for key in io[0]}
    return {
        "num_params": ranks[0]["num_params"],
        "tokens_per_step": tokens,
        "steps": len(steps),
        "steady_steps": [i + 1 for i in kept],
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "step_times_s": [s["step_s"] for s in steps],
        "losses": [s["loss"] for s in steps],
        "io_per_step": io,
        "steady_io": steady_io,
        "setup_s": max(rank["setup_s"] for rank in ranks),
        "peak_rss_per_rank_bytes": [max(s["peak_rss_bytes"] or 0 for s in rank["steps"]) for rank in ranks],
        "cgroup_peak_bytes": result["job"]["peak_bytes"],
        "job_wall_s": result["job"]["wall_s"],
        "cpu_share_per_step": [
            statistics.mean(r["steps"][i].get("cpu_share", float("nan")) for r in ranks) for i in range(len(steps))
        ],
        "load_avg_per_step": [steps[i].get("load_avg_1m") for i in range(len(steps))],
        "notes": ranks[0].get("notes", []),
    }


def disk_plan(model: dict[str, int], settings: Settings) -> dict[str, Any]:
    """What a model's states take on disk, what stays free after, and whether plait will accept it."""
    params = num_params(model)
    state = params * STATE_BYTES_PER_PARAM
    free = free_disk_bytes(settings.offload_root)
    return {
        "num_params": params,
        "state_bytes": state,
        "free_before_bytes": free,
        "free_after_bytes": free - state,
        "fits": free - state >= settings.keep_free_bytes and free >= state * DISK_HEADROOM,
    }


def print_steps(summary: dict[str, Any]) -> None:
    rows = []
    for index, (step_s, loss) in enumerate(zip(summary["step_times_s"], summary["losses"], strict=True)):
        io = summary["io_per_step"][index]
        rows.append(
            [
                index + 1,
                f"{step_s:.1f}",
                f"{summary['tokens_per_step'] / step_s:.1f}",
                f"{loss:.4f}",
                f"{io['read_bytes'] / GB:.2f}",
                f"{io['write_bytes'] / GB:.2f}",
                f"{io['hidden_share']:.2f}",
                f"{summary['cpu_share_per_step'][index]:.2f}",
                f"{summary['load_avg_per_step'][index] or float('nan'):.1f}",
            ]
        )
    headers = ["step", "time s", "tokens/s", "loss", "disk read GB", "disk write GB", "I/O hidden", "CPU share", "load"]
    print(format_table(headers, rows))


# ---------------------------------------------------------------------------
# Part: the big run


def big_model(settings: Settings) -> tuple[dict[str, int], dict[str, Any]]:
    """>= 4B parameters, or the largest that leaves keep_free_bytes of disk free (said in the record)."""
    if settings.quick:
        model = shape(128, settings.big_layers or 4, heads=4, vocab=2048, seq=64)
        return model, {"rule": "quick: a tiny model", **disk_plan(model, settings)}
    # d_model 3072: units of 113M parameters; at 4096 (201M) the pages in flight during backward's
    # updates (about 6.5 GiB a rank at 4096) plus activations overran the 20 GiB cap
    width = {"d_model": 3072, "heads": 24, "vocab": 8192, "seq": 256}
    layers = settings.big_layers or layers_for(4e9, **width)
    rule = f"{layers} layers: the fewest that reach 4B parameters"
    while layers > 1 and not disk_plan(shape(width["d_model"], layers, **_named(width)), settings)["fits"]:
        layers -= 1
        rule = f"{layers} layers: the largest whose states leave {settings.keep_free_bytes / GB:.0f} GB of disk free"
    model = shape(width["d_model"], layers, **_named(width))
    return model, {"rule": rule, **disk_plan(model, settings)}


def _named(width: dict[str, int]) -> dict[str, int]:
    return {"heads": width["heads"], "vocab": width["vocab"], "seq": width["seq"]}


def part_big(settings: Settings) -> dict[str, Any]:
    model, sizing = big_model(settings)
    print(f"\n== big: {sizing['num_params'] / 1e9:.2f}B parameters ({sizing['rule']}), everything on disk")
    print(
        f"   states {sizing['state_bytes'] / GB:.1f} GB on disk; disk free {sizing['free_before_bytes'] / GB:.1f} GB "
        f"before, {sizing['free_after_bytes'] / GB:.1f} GB after; cap {format_bytes(settings.cap_bytes)} for the job"
    )
    if not sizing["fits"]:
        return {"skipped": "the free disk cannot hold even a 1-layer model's states", "sizing": sizing}
    disk = {"offload_optimizer": "disk", "offload_gradients": "disk", "offload_params": "disk"}
    spec = {
        "kind": "train",
        "model": model,
        "plan": {"zero": 3, **disk},
        "batch": 2,
        "seq": model["max_seq_len"],
        "steps": settings.big_steps,
        "lazy": True,
    }
    result = run_job("big", spec, settings)
    record: dict[str, Any] = {"sizing": sizing, "model": model, "plan": spec["plan"], "cap_bytes": settings.cap_bytes}
    if "error" in result:
        return {**record, "error": result["error"], "job": result["job"]}
    summary = summarize(result)
    print_steps(summary)
    print(
        f"   steady step {summary['step_s']:.1f} s = {summary['tokens_per_s']:.2f} tokens/s; cgroup peak "
        f"{format_bytes(summary['cgroup_peak_bytes'])} of {format_bytes(settings.cap_bytes)}; set-up "
        f"{summary['setup_s']:.0f} s; job {summary['job_wall_s']:.0f} s"
    )
    return {**record, "summary": summary, "job": result["job"]}


# ---------------------------------------------------------------------------
# Part: overlap


def io_seconds(io: dict[str, float], dd: dict[str, Any]) -> float:
    """The time a step's disk bytes (both ranks) take at dd's O_DIRECT bandwidth, reads and writes in turn."""
    return io["read_bytes"] / dd["read_bytes_per_s"] + io["write_bytes"] / dd["write_bytes_per_s"]


def overlap_model(settings: Settings) -> tuple[dict[str, int], int]:
    """The model and a per-rank budget of half its per-rank model states (16P/2 on each of 2 ranks)."""
    # many small units: the budget must exceed the working set (gathered units, staging) by a margin
    model = shape(128, 24, heads=4, vocab=2048, seq=64) if settings.quick else shape(1024, 24, heads=16, seq=128)
    budget = num_params(model) * STATE_BYTES_PER_PARAM // 2 // 2
    return model, budget


def part_overlap(settings: Settings) -> dict[str, Any]:
    model, budget = overlap_model(settings)
    params = num_params(model)
    print(
        f"\n== overlap: {params / 1e6:.0f}M parameters, states {format_bytes(8 * params)} per rank = 2 x "
        f"plan.memory_budget {format_bytes(budget)} (auto placement); 1 x {model['max_seq_len']} tokens per rank"
    )
    base = {"kind": "train", "model": model, "batch": 1, "seq": model["max_seq_len"], "steps": 6, "lazy": True}
    specs = {
        "offload": {**base, "plan": {"zero": 3, "memory_budget": f"{budget}B"}},
        "memory": {**base, "steps": 4, "plan": {"zero": 3}},
    }
    skips = {"offload": 3, "memory": 1}  # the budget re-places the states after the second step
    pairs = []
    for pair in range(1 if settings.quick else 2):
        order = ["offload", "memory"] if pair % 2 == 0 else ["memory", "offload"]
        runs = {name: run_job(f"overlap-{name}-{pair}", specs[name], settings) for name in order}
        failed = [name for name, run in runs.items() if "error" in run]
        if failed:
            return {"error": {name: runs[name]["error"] for name in failed}, "model": model, "budget_bytes": budget}
        pairs.append(overlap_pair(runs, skips, settings.dd))
    return overlap_record(pairs, model=model, budget=budget)


def overlap_pair(runs: dict[str, dict[str, Any]], skips: dict[str, int], dd: dict[str, Any]) -> dict[str, Any]:
    offload = summarize(runs["offload"], skip=skips["offload"])
    memory = summarize(runs["memory"], skip=skips["memory"])
    io_s = io_seconds(offload["steady_io"], dd)
    bound = max(memory["step_s"], io_s)
    return {
        "step_s": offload["step_s"],
        "compute_s": memory["step_s"],
        "io_s": io_s,
        "ratio_step_over_max": offload["step_s"] / bound,
        "offload": offload,
        "memory": memory,
    }


def overlap_record(pairs: list[dict[str, Any]], *, model: dict[str, int], budget: int) -> dict[str, Any]:
    rows = [
        [
            index + 1,
            f"{p['step_s']:.2f}",
            f"{p['compute_s']:.2f}",
            f"{p['io_s']:.2f}",
            f"{p['offload']['steady_io']['read_bytes'] / GB:.2f}",
            f"{p['offload']['steady_io']['write_bytes'] / GB:.2f}",
            f"{p['offload']['steady_io']['hidden_share']:.2f}",
            f"{p['ratio_step_over_max']:.2f}",
        ]
        for index, p in enumerate(pairs)
    ]
    headers = ["pair", "step s", "compute s", "I/O s (dd)", "read GB", "write GB", "hidden", "step/max"]
    print(format_table(headers, rows))
    ratio = statistics.median(p["ratio_step_over_max"] for p in pairs)
    print(
        f"   step / max(compute, I/O) = {ratio:.2f} (target <= {OVERLAP_TARGET}): {'PASS' if ratio <= OVERLAP_TARGET else 'SHORT'}"
    )
    return {
        "model": model,
        "num_params": num_params(model),
        "budget_bytes": budget,
        "compute_how": "the same model and batches, plait ZeRO-3 without offload (it fits the cap), steady steps",
        "io_how": "each steady step's disk bytes summed over both ranks / dd O_DIRECT 16 MiB bandwidth (read, write)",
        "pairs": pairs,
        "ratio_step_over_max_median": ratio,
        "target": OVERLAP_TARGET,
    }


# ---------------------------------------------------------------------------
# Part: host optimizer


def part_optimizer(settings: Settings) -> dict[str, Any]:
    model = shape(128, 2, heads=4, vocab=2048, seq=32) if settings.quick else shape(768, 10, heads=12, seq=32)
    print(f"\n== optimizer: the host AdamW step on {num_params(model) / 1e6:.1f}M parameters, one thread")
    spec = {
        "kind": "optimizer",
        "model": model,
        "batch": 1,
        "seq": 32,
        "rounds": 3 if settings.quick else settings.optimizer_rounds,
    }
    result = run_job("optimizer", {**spec, "deepspeed": True}, settings)
    if "error" in result:
        return {"error": result["error"], "model": model}
    rates = result["params_per_s"]
    rows = [[name, f"{result['median_s'][name] * 1e3:.1f}", f"{rate / 1e6:.0f}"] for name, rate in rates.items()]
    print(format_table(["system", "step ms (median)", "M params/s/core"], rows))
    ratios = {
        f"plait_over_{name}": per_round_ratios(result["seconds"][name], result["seconds"]["plait"])
        for name in rates
        if name != "plait"
    }
    for name, ratio in ratios.items():
        target = f" (target >= {OPTIMIZER_TARGET})" if name.endswith("torch_fused") else ""
        print(f"   {name}: {ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}]{target}")
    for name, error in result["errors"].items():
        print(f"   {name} did not run: {error}")
    return {"model": model, "result": result, "ratios": ratios, "target": OPTIMIZER_TARGET}


def per_round_ratios(other_s: list[float], plait_s: list[float]) -> dict[str, Any]:
    """plait's speed over another's per alternated round (seconds other / seconds plait), median and range."""
    ratios = [o / p for o, p in zip(other_s, plait_s, strict=True)]
    return {"per_round": ratios, "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# ---------------------------------------------------------------------------
# Part: DeepSpeed ZeRO-Offload


DEEPSPEED_OPTIONS = {"stage": 3, "offload_param": True, "optimizer": "cpu_adam"}
PLAIT_CPU_TIERS = {"offload_optimizer": "cpu", "offload_gradients": "cpu", "offload_params": "cpu"}


def peer_model(settings: Settings, num_layers: int) -> dict[str, int]:
    return shape(128, num_layers, heads=4, vocab=2048, seq=64) if settings.quick else shape(2048, num_layers, heads=16)


def peer_spec(model: dict[str, int], steps: int) -> dict[str, Any]:
    return {"kind": "train", "model": model, "batch": 2, "seq": model["max_seq_len"], "steps": steps, "lazy": True}


def search_deepspeed(settings: Settings, steps: int) -> tuple[int | None, dict[int, dict[str, Any]]]:
    """Coarse search over layer counts: the largest DeepSpeed runs within the cap (start in the middle)."""
    candidates = [2, 4, 8] if settings.quick else [8, 12, 16, 20, 24]
    runs: dict[int, dict[str, Any]] = {}
    low, high = 0, len(candidates) - 1
    best = None
    while low <= high:
        middle = (low + high) // 2
        layers = candidates[middle]
        spec = {**peer_spec(peer_model(settings, layers), steps), "deepspeed": DEEPSPEED_OPTIONS}
        runs[layers] = run_job(f"peer-deepspeed-L{layers}", spec, settings, system="deepspeed")
        if "error" in runs[layers]:
            high = middle - 1
        else:
            best, low = layers, middle + 1
    return best, runs


def part_peer(settings: Settings) -> dict[str, Any]:
    steps = 3
    print(f"\n== peer: DeepSpeed ZeRO-3 {DEEPSPEED_OPTIONS}, 2 ranks, gloo, cap {format_bytes(settings.cap_bytes)}")
    best, searched = search_deepspeed(settings, steps)
    search = {layers: search_row(run) for layers, run in searched.items()}
    if best is None:
        print("   DeepSpeed ran at no size; errors in the record")
        return {"search": search, "errors": {k: v["error"] for k, v in searched.items() if "error" in v}}
    model = peer_model(settings, best)
    plait_spec = {**peer_spec(model, steps), "plan": {"zero": 3, **PLAIT_CPU_TIERS}}
    ds_spec = {**peer_spec(model, steps), "deepspeed": DEEPSPEED_OPTIONS}
    runs = {"deepspeed": [searched[best]], "plait": [run_job(f"peer-plait-L{best}-0", plait_spec, settings)]}
    for pair in range(1, 1 if settings.quick else settings.peer_pairs):
        order = ["plait", "deepspeed"] if pair % 2 else ["deepspeed", "plait"]
        for name in order:
            spec, system = (plait_spec, "plait") if name == "plait" else (ds_spec, "deepspeed")
            runs[name].append(run_job(f"peer-{name}-L{best}-{pair}", spec, settings, system=system))
    return peer_record(runs, search=search, model=model)


def search_row(run: dict[str, Any]) -> dict[str, Any]:
    row = {"num_params": num_params(run["spec"]["model"]), "cgroup_peak_bytes": run["job"]["peak_bytes"]}
    if "error" in run:
        return {**row, "error": run["error"]}
    summary = summarize(run)
    return {**row, "step_s": summary["step_s"], "tokens_per_s": summary["tokens_per_s"], "losses": summary["losses"]}


def peer_record(runs: dict[str, list[dict[str, Any]]], **record: Any) -> dict[str, Any]:
    ok = {name: [summarize(r) for r in found if "error" not in r] for name, found in runs.items()}
    errors = {name: [r["error"] for r in found if "error" in r] for name, found in runs.items()}
    record["search_rows"] = [
        [
            layers,
            f"{row['num_params'] / 1e9:.2f}",
            row.get("error", "ok").splitlines()[0][:60],
            format_bytes(row["cgroup_peak_bytes"]),
        ]
        for layers, row in sorted(record["search"].items())
    ]
    print(format_table(["layers", "B params", "DeepSpeed", "cgroup peak"], record["search_rows"]))
    rows = []
    for name, summaries in ok.items():
        for index, summary in enumerate(summaries):
            rows.append(
                [
                    name,
                    index + 1,
                    f"{summary['step_s']:.1f}",
                    f"{summary['tokens_per_s']:.2f}",
                    format_bytes(summary["cgroup_peak_bytes"]),
                    " ".join(f"{x:.4f}" for x in summary["losses"]),
                ]
            )
    print(format_table(["system", "run", "step s", "tokens/s", "cgroup peak", "losses"], rows))
    pairs = min(len(ok["plait"]), len(ok["deepspeed"]))
    ratios = [ok["plait"][i]["tokens_per_s"] / ok["deepspeed"][i]["tokens_per_s"] for i in range(pairs)]
    if ratios:
        median = statistics.median(ratios)
        print(
            f"   tokens/s plait / DeepSpeed = {median:.2f} over {pairs} pair(s) {[round(r, 2) for r in ratios]} "
            f"(target >= {PEER_TARGET}): {'PASS' if median >= PEER_TARGET else 'SHORT'}"
        )
    return {
        **record,
        "runs": ok,
        "errors": errors,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios) if ratios else None,
        "target": PEER_TARGET,
        "deepspeed_options": DEEPSPEED_OPTIONS,
        "plait_plan": {"zero": 3, **PLAIT_CPU_TIERS},
    }


# ---------------------------------------------------------------------------
# Part: step time vs model size, per tier


def sweep_sizes(settings: Settings) -> list[dict[str, int]]:
    """Models whose states are 0.25x, 0.5x, 1x and 2x the cap (16 bytes a parameter), 256 tokens a step."""
    if settings.quick:
        return [shape(128, layers, heads=4, vocab=2048, seq=64) for layers in (2, 4, 8)]
    width = {"d_model": 2048, "heads": 16, "vocab": 8192, "seq": 128}
    sizes = []
    for multiple in settings.sweep_multiples:
        layers = layers_for(multiple * settings.cap_bytes / STATE_BYTES_PER_PARAM, **width)
        sizes.append(shape(width["d_model"], layers, **_named(width)))
    return sizes


def part_sweep(settings: Settings) -> dict[str, Any]:
    print(f"\n== sweep: step time vs size, plait's cpu and disk tiers, cap {format_bytes(settings.cap_bytes)}")
    rows, points = [], []
    for model in sweep_sizes(settings):
        for tier in ("cpu", "disk"):
            point = sweep_point(model, tier, settings)
            points.append(point)
            rows.append(
                [
                    f"{point['num_params'] / 1e9:.2f}",
                    tier,
                    point.get("step_s_text", ""),
                    point.get("peak_text", ""),
                    point.get("why", ""),
                ]
            )
    print(format_table(["B params", "tier", "step s", "cgroup peak", "note"], rows))
    return {"points": points, "tokens_per_step": 2 * sweep_sizes(settings)[0]["max_seq_len"]}


def sweep_point(model: dict[str, int], tier: str, settings: Settings) -> dict[str, Any]:
    params = num_params(model)
    point: dict[str, Any] = {"num_params": params, "tier": tier, "model": model}
    state = params * STATE_BYTES_PER_PARAM
    if tier == "cpu" and state > 0.85 * settings.cap_bytes:
        return {**point, "why": f"not run: states {state / GB:.1f} GB do not fit the cap in memory"}
    if tier == "disk" and not disk_plan(model, settings)["fits"]:
        return {**point, "why": "not run: the free disk cannot hold the states"}
    spec = {"kind": "train", "model": model, "batch": 1, "seq": model["max_seq_len"], "steps": 2, "lazy": True}
    tiers = {f"offload_{s}": tier for s in ("optimizer", "gradients", "params")}
    result = run_job(f"sweep-{tier}-L{model['num_layers']}", {**spec, "plan": {"zero": 3, **tiers}}, settings)
    if "error" in result:
        return {**point, "why": result["error"].splitlines()[0], "cgroup_peak_bytes": result["job"]["peak_bytes"]}
    summary = summarize(result)
    return {
        **point,
        "step_s": summary["step_s"],
        "step_s_text": f"{summary['step_s']:.1f}",
        "peak_text": format_bytes(summary["cgroup_peak_bytes"]),
        "summary": summary,
    }


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Step time vs model size per tier (the sweep), the big run marked apart (its steps hold more tokens)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    parts = results.get("parts", {})
    figure, axes = plt.subplots(figsize=(7, 4.5))
    sweep = parts.get("sweep", {})
    for tier, marker in (("cpu", "o"), ("disk", "s")):
        done = [p for p in sweep.get("points", []) if p["tier"] == tier and "step_s" in p]
        if done:
            axes.plot(
                [p["num_params"] / 1e9 for p in done],
                [p["step_s"] for p in done],
                marker=marker,
                label=f"plait, {tier} tier ({sweep['tokens_per_step']} tokens/step)",
            )
    big = parts.get("big", {}).get("summary")
    if big:
        axes.plot(
            [big["num_params"] / 1e9],
            [big["step_s"]],
            "*",
            markersize=14,
            label=f"big run, disk tier ({big['tokens_per_step']} tokens/step)",
        )
    cap = results.get("cap_bytes")
    if cap:
        axes.axvline(
            cap / STATE_BYTES_PER_PARAM / 1e9,
            color="grey",
            linestyle=":",
            label=f"states = the {cap / 2**30:.0f} GiB cap",
        )
    axes.set_xlabel("parameters (billions)")
    axes.set_ylabel("step time (s)")
    axes.set_title("plait offload: step time vs model size, 2 ranks x 1 thread, fp32")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------
# Driver


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_part(path: Path, name: str, record: dict[str, Any], settings: Settings) -> None:
    """Merge one part's record into the results JSON (parts run separately keep each other's)."""
    results = load_results(path)
    record = {**record, "dd": settings.dd, "environment": environment(), "wall_finished": time.time()}
    results.setdefault("parts", {})[name] = record
    results["dd"] = settings.dd
    results["cap_bytes"] = settings.cap_bytes
    results["job_env"] = JOB_ENV
    write_json(path, results)


PART_FUNCTIONS = {
    "big": part_big,
    "overlap": part_overlap,
    "optimizer": part_optimizer,
    "peer": part_peer,
    "sweep": part_sweep,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the harness end to end in minutes")
    parser.add_argument("--cap-gib", type=float, default=20.0, help="memory cap of each job's cgroup (default 20)")
    parser.add_argument("--offload-root", type=Path, default=Path("/tmp"), help="where offload dirs are made")
    parser.add_argument("--keep-free-gb", type=float, default=10.0, help="disk the big run leaves free (default 10)")
    parser.add_argument("--big-steps", type=int, default=3, help="steps of the big run (default 3)")
    parser.add_argument("--big-layers", type=int, default=None, help="override the big model's layer count")
    parser.add_argument("--optimizer-rounds", type=int, default=10, help="alternated optimizer steps per system")
    parser.add_argument("--peer-pairs", type=int, default=2, help="DeepSpeed/plait pairs at the peer size")
    parser.add_argument("--sweep-multiples", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--dd-gib", type=float, default=None, help="dd probe size (default 4, quick 0.5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/offload.json, quick -quick)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or RESULTS_DIR / ("offload-quick.json" if args.quick else "offload.json")
    workdir = Path("/tmp/plait-offload-bench") / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        quick=args.quick,
        cap_bytes=int(args.cap_gib * 2**30),
        offload_root=args.offload_root,
        keep_free_bytes=int(args.keep_free_gb * GB),
        workdir=workdir,
        big_steps=args.big_steps,
        big_layers=args.big_layers,
        peer_pairs=args.peer_pairs,
        optimizer_rounds=args.optimizer_rounds,
        sweep_multiples=tuple(args.sweep_multiples),
    )
    dd_gib = args.dd_gib or (0.5 if args.quick else 4.0)
    settings.dd = dd_bandwidth(args.offload_root, num_bytes=int(dd_gib * 2**30))
    print(
        f"disk ({args.offload_root}): dd O_DIRECT 16 MiB blocks: write {settings.dd['write_bytes_per_s'] / GB:.2f} GB/s,"
        f" read {settings.dd['read_bytes_per_s'] / GB:.2f} GB/s; {free_disk_bytes(args.offload_root) / GB:.1f} GB free;"
        f" job logs in {workdir}"
    )
    started = time.perf_counter()
    for name in [p for p in PARTS if p in args.only]:
        part_started = time.perf_counter()
        record = PART_FUNCTIONS[name](settings)
        record["part_wall_s"] = time.perf_counter() - part_started
        save_part(out, name, record, settings)
    png = plot(load_results(out), out.with_suffix(".png"))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
