"""The peer of the offload benchmark: DeepSpeed ZeRO-Offload training plait's GPT on CPU/gloo.

    torchrun --nproc_per_node 2 benchmarks/offload_peers.py SPEC.json OUT.json

SPEC is the offload_jobs.py "train" spec (model, batch, seq, steps, seed),
plus "deepspeed": {"stage": 2 or 3, "offload_param": bool, "optimizer":
"cpu_adam" (DeepSpeedCPUAdam, DeepSpeed's own host step) or "torch_adam"}.
The model is plait's GPT (plait.models) as a plain nn.Module, built inside
`deepspeed.zero.Init` at stage 3 (so no rank ever holds the whole model), the
loss plait.losses.causal_lm's sum over the local token count (DeepSpeed
averages gradients over ranks; every rank has as many tokens). The same
random batches as plait's jobs, so the losses can be compared step by step.
Rank 0 writes OUT.json: per step wall time between barriers, global loss,
each rank's peak RSS.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from offload_jobs import LR, make_batch, peak_rss_bytes

import plait


def _deepspeed() -> Any:
    """DeepSpeed, imported only when a job runs: the module imports, and main() explains, without it."""
    return importlib.import_module("deepspeed")


def ds_config(spec: dict[str, Any], world: int) -> dict[str, Any]:
    options = spec["deepspeed"]
    zero: dict[str, Any] = {"stage": options["stage"], "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    if options["stage"] == 3 and options.get("offload_param", True):
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    params = {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
    if options.get("optimizer", "cpu_adam") == "torch_adam":
        params["torch_adam"] = True
    return {
        "train_batch_size": spec["batch"] * world,
        "train_micro_batch_size_per_gpu": spec["batch"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_model(spec: dict[str, Any], config: dict[str, Any]) -> torch.nn.Module:
    lazy = config["zero_optimization"]["stage"] == 3
    deepspeed = _deepspeed()
    context = deepspeed.zero.Init(config_dict_or_path=config) if lazy else contextlib.nullcontext()
    torch.manual_seed(spec.get("seed", 0))
    with context:
        model = plait.models.build(plait.models.GPTConfig(**spec["model"]))
    if lazy:
        init_partitioned(model, seed=spec.get("seed", 0))
    return model


def init_partitioned(model: torch.nn.Module, *, seed: int) -> None:
    """plait's init, module by module in its order, on the gathered parameters (rank 0 draws, as
    plait's ranks draw, from the same seed: the same initial weights as plait's runs)."""
    deepspeed = _deepspeed()
    torch.manual_seed(seed)
    for module in model.init_order():
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                model.init_module(module)


def global_mean(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def train(spec: dict[str, Any]) -> dict[str, Any]:
    deepspeed = _deepspeed()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(spec.get("threads", 1))
    started = time.perf_counter()
    config = ds_config(spec, world)
    model = build_model(spec, config)
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    dist.barrier()
    setup_s = time.perf_counter() - started
    steps = []
    for step in range(spec["steps"]):
        batch = make_batch(spec, rank=rank, step=step)
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_sum, num_tokens = plait.losses.causal_lm(engine(**batch), batch)
        loss = loss_sum / num_tokens
        engine.backward(loss)
        engine.step()
        local = loss.item()
        dist.barrier()
        record = {"step": step + 1, "step_s": time.perf_counter() - start, "loss": global_mean(local)}
        record["cpu_share"] = (time.process_time() - cpu_start) / record["step_s"]
        record["load_avg_1m"] = os.getloadavg()[0]
        record["peak_rss_bytes"] = peak_rss_bytes()
        steps.append(record)
        if rank == 0:
            print(f"step {step + 1}: {record['step_s']:.1f} s, loss {record['loss']:.4f}", flush=True)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "num_params": num_params, "setup_s": setup_s, "steps": steps})
    return {"spec": spec, "ds_config": config, "deepspeed": deepspeed.__version__, "ranks": gathered}


def main() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        sys.exit(
            "deepspeed is not importable here: pip install --target DIR --no-deps deepspeed hjson msgpack ninja "
            "psutil py-cpuinfo einops nvidia-ml-py, then PYTHONPATH=DIR; offload.py reports plait's rows without it"
        )
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = train(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(sys.argv[2]).write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
