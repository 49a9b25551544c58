"""Save and restore the whole training state of a run.

Weights are saved whole (ZeRO-3 and tensor parallel gather them); optimizer
state stays in each rank's own shard, gathered to rank 0 and saved in global
rank order, so resuming a sharded run needs the same dp, tp and ZeRO stage
(resharding is a later issue). A plain data-parallel run resumes under any dp.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.checkpoint.io import CONFIG_FILE, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from plait.config import Config, Plan
from plait.data.loader import ShardedLoader
from plait.dist.launch import is_main_rank
from plait.engine import Engine


def _is_replicated(engine: Engine) -> bool:
    return engine.plan.zero == 0 and engine.mesh.size("tp") == 1 and engine.mesh.size("pp") == 1


def _gather_to_main(obj: Any, engine: Engine) -> list[Any]:
    """Every rank's `obj` in global-rank order on the main rank (others get []); replicas send one."""
    if not dist.is_initialized() or _is_replicated(engine):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size() if is_main_rank() else []
    dist.gather_object(obj, gathered if is_main_rank() else None, dst=0)
    return gathered if is_main_rank() else []


def save_training_state(
    path: Path, *, engine: Engine, loader: ShardedLoader, step: int, config: Config, tokenizer_json: str
) -> None:
    """Every rank takes part (ZeRO-3 gathers weights, optimizer shards travel to rank 0); rank 0 writes."""
    state = engine.state_dict()
    optimizer_shards = _gather_to_main(state["optimizer"], engine)
    if is_main_rank():
        trainer_state = {
            "optimizer_shards": optimizer_shards,
            "scheduler": state["scheduler"],
            "scaler": state["scaler"],
            "loader": loader.state_dict(),
            "step": step,
            "rng": rng_state(),
            "tokenizer": tokenizer_json,
            "layout": {
                "dp": engine.dp_size,
                "tp": engine.mesh.size("tp"),
                "pp": engine.mesh.size("pp"),
                "zero": engine.plan.zero,
            },
        }
        save_checkpoint(
            path, model_state=state["model"], trainer_state=trainer_state, config=dataclasses.asdict(config)
        )
    if dist.is_initialized():
        dist.barrier()


def check_resumable(path: Path, *, plan: Plan) -> None:
    """Raise, before any rank starts, if the checkpoint's optimizer layout differs from this plan's."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"--resume {path}: no {CONFIG_FILE} there; pick a directory under <out_dir>/checkpoints")
    saved = json.loads(config_file.read_text())["plan"]
    saved_tp, saved_pp = saved.get("tp", 1), saved.get("pp", 1)
    replicated = plan.zero == 0 and plan.tp == 1 and plan.pp == 1
    same = (saved["zero"], saved_tp, saved_pp) == (plan.zero, plan.tp, plan.pp) and (
        replicated or saved["dp"] == plan.dp
    )
    if not same:
        raise ValueError(
            f"--resume {path}: saved under zero={saved['zero']}, dp={saved['dp']}, tp={saved_tp}, pp={saved_pp} but "
            f"this run is zero={plan.zero}, dp={plan.dp}, tp={plan.tp}, pp={plan.pp}; its optimizer shards only load "
            "into the same layout: resume with that plan (resharding is not available yet)"
        )


def restore(path: Path, *, engine: Engine, loader: ShardedLoader) -> int:
    """Load a checkpoint into the engine and loader; returns the step to continue from."""
    model_state, trainer_state, _ = load_checkpoint(path)
    shards = trainer_state["optimizer_shards"]
    optimizer_state = shards[0] if _is_replicated(engine) else shards[dist.get_rank()]
    engine.load_state_dict(
        {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": trainer_state["scheduler"],
            "scaler": trainer_state["scaler"],
        }
    )
    loader.load_state_dict(trainer_state["loader"])
    set_rng_state(trainer_state["rng"])
    return int(trainer_state["step"])
