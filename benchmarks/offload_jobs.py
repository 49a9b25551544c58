"""plait's side of the offload benchmark: one job per process tree, so each runs in its own memory cgroup.

    python benchmarks/offload_jobs.py SPEC.json OUT.json

SPEC["kind"] is
- "train": a GPT (SPEC["model"]: GPTConfig fields) trained for SPEC["steps"]
  steps on SPEC["world"] forked gloo ranks of one thread each, under the
  plait.Plan fields in SPEC["plan"] (offload tiers, offload_dir, budget);
  built on the meta device when SPEC["lazy"]. Random tokens, the same on
  every run (seeded per rank). Per step: wall time between barriers, the
  global loss, and each rank's `engine.offload.stats()`.
- "optimizer": the host optimizer step on one thread: plait's offloaded
  optimizer phase (dp=1, zero=1, offload_optimizer="cpu"; its
  `stats()["optimizer_s"]`) against torch AdamW(fused=True) and DeepSpeed's
  DeepSpeedCPUAdam on one flat tensor of as many parameters, alternated.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import plait
from plait.distributed.forked import run_forked

LR = 1e-4


def peak_rss_bytes() -> int | None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(spec.get("seed", 0))
    if spec.get("lazy"):
        with torch.device("meta"):
            return plait.models.build(plait.models.GPTConfig(**spec["model"]))
    return plait.models.build(plait.models.GPTConfig(**spec["model"]))


def make_batch(spec: dict[str, Any], *, rank: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * spec.get("seed", 0) + 17 * rank + step)
    tokens = torch.randint(0, spec["model"]["vocab_size"], (spec["batch"], spec["seq"]), generator=gen)
    return {"input_ids": tokens, "labels": tokens}


# ---------------------------------------------------------------------------
# Training steps


def train_rank(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    model = build_model(spec)
    num_params = sum(p.numel() for p in model.parameters())
    plan = plait.Plan(dp=world, **spec["plan"])
    engine = plait.boost(model, optimizer=plait.optim.adamw(lr=LR), loss_fn=plait.losses.causal_lm, plan=plan)
    dist.barrier()
    setup_s = time.perf_counter() - started
    steps = []
    for step in range(spec["steps"]):
        batch = make_batch(spec, rank=rank, step=step)
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = engine.train_step(batch)
        loss = result.loss.item()
        dist.barrier()
        record: dict[str, Any] = {"step": step + 1, "step_s": time.perf_counter() - start, "loss": loss}
        # the rank's CPU seconds (all its threads) over the step's wall time: low when the box is shared
        record["cpu_share"] = (time.process_time() - cpu_start) / record["step_s"]
        record["load_avg_1m"] = os.getloadavg()[0]
        if engine.offload is not None:
            record["offload"] = engine.offload.stats()
        record["peak_rss_bytes"] = peak_rss_bytes()
        steps.append(record)
        if rank == 0:
            print(f"step {step + 1}: {record['step_s']:.1f} s, loss {loss:.4f}", flush=True)
    notes = list(engine.offload.notes) if engine.offload is not None else []
    engine.close()
    return {"rank": rank, "num_params": num_params, "setup_s": setup_s, "steps": steps, "notes": notes}


def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    ranks = run_forked(
        train_rank, spec["world"], spec, num_threads=spec.get("threads", 1), timeout_s=spec["timeout_s"], capture=False
    )
    return {"spec": spec, "ranks": ranks}


# ---------------------------------------------------------------------------
# Host optimizer step


class PlaitOptimizerPhase:
    """One engine (dp=1, zero=1, optimizer on the host tier); its optimizer phase per train_step."""

    def __init__(self, spec: dict[str, Any]) -> None:
        model = build_model(spec)
        self.num_params = sum(p.numel() for p in model.parameters())
        plan = plait.Plan(dp=1, zero=1, offload_optimizer="cpu")
        self.engine = plait.boost(model, optimizer=plait.optim.adamw(lr=LR), loss_fn=plait.losses.causal_lm, plan=plan)
        self.spec = spec
        self.num_steps = 0

    def __call__(self) -> float:
        self.engine.train_step(make_batch(self.spec, rank=0, step=self.num_steps))
        self.num_steps += 1
        return self.engine.offload.stats()["optimizer_s"]


class FlatOptimizer:
    """An optimizer's step() on one flat fp32 tensor with a gradient (the state made by a first step)."""

    def __init__(self, make: Any, num_params: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.param = torch.nn.Parameter(torch.randn(num_params, generator=gen) * 0.02)
        self.param.grad = torch.randn(num_params, generator=gen) * 1e-3
        self.optimizer = make([self.param])
        self.optimizer.step()

    def __call__(self) -> float:
        start = time.perf_counter()
        self.optimizer.step()
        return time.perf_counter() - start


def deepspeed_cpu_adam(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, adamw_mode=True)


def make_systems(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    systems: dict[str, Any] = {"plait": PlaitOptimizerPhase(spec)}
    num_params = systems["plait"].num_params
    errors = {}
    systems["torch_fused"] = FlatOptimizer(
        lambda ps: torch.optim.AdamW(ps, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True), num_params
    )
    if spec.get("deepspeed"):
        try:
            systems["deepspeed_cpu_adam"] = FlatOptimizer(deepspeed_cpu_adam, num_params)
        except Exception as error:  # report exactly why it did not build or run
            errors["deepspeed_cpu_adam"] = "".join(traceback.format_exception_only(error)).strip()
    return systems, errors


def run_optimizer(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    systems, errors = make_systems(spec)
    num_params = systems["plait"].num_params
    for system in systems.values():
        system()  # warm-up: plait's first step creates its state
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for round_index in range(spec["rounds"]):
        order = names if round_index % 2 == 0 else names[::-1]  # alternate, cancelling drift
        for name in order:
            seconds[name].append(systems[name]())
    gc.collect()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "spec": spec,
        "num_params": num_params,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "median_s": medians,
        "params_per_s": {name: num_params / s for name, s in medians.items()},
        "errors": errors,
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    runner = {"train": run_train, "optimizer": run_optimizer}[spec["kind"]]
    result = runner(spec)
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
