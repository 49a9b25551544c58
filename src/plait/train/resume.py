"""Save and restore the whole training state of a run.

Weights are saved whole (ZeRO-3 gathers them); optimizer state stays in
each dp rank's own shard, gathered to rank 0 and saved in dp-rank order, so
resuming needs the same dp size and ZeRO stage (resharding is a later issue).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.checkpoint.io import CONFIG_FILE, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from plait.config import Config
from plait.data.loader import ShardedLoader
from plait.dist.launch import is_main_rank
from plait.engine import Engine


def _gather_to_main(obj: Any, engine: Engine) -> list[Any]:
    """Every dp rank's `obj`, in dp-rank order, on the main rank (others get [])."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size() if is_main_rank() else []
    dist.gather_object(obj, gathered if is_main_rank() else None, dst=0)
    if not is_main_rank():
        return []
    world_ranks_by_dp = engine.mesh.dp_ranks_of_main_replica()
    return [gathered[rank] for rank in world_ranks_by_dp]


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
            "layout": {"dp": engine.dp_size, "zero": engine.plan.zero},
        }
        save_checkpoint(
            path, model_state=state["model"], trainer_state=trainer_state, config=dataclasses.asdict(config)
        )
    if dist.is_initialized():
        dist.barrier()


def check_resumable(path: Path, *, dp: int, zero: int) -> None:
    """Raise, before any rank starts, if the checkpoint's optimizer layout differs from this plan's."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"--resume {path}: no {CONFIG_FILE} there; pick a directory under <out_dir>/checkpoints")
    saved = json.loads(config_file.read_text())["plan"]
    saved_zero = saved["zero"]
    if saved_zero != zero or (zero > 0 and saved["dp"] != dp):
        raise ValueError(
            f"--resume {path}: saved under zero={saved_zero}, dp={saved['dp']} but this run is zero={zero}, dp={dp}; "
            "its optimizer shards only load into the same layout: resume with that plan (resharding is not available yet)"
        )


def restore(path: Path, *, engine: Engine, loader: ShardedLoader) -> int:
    """Load a checkpoint into the engine and loader; returns the step to continue from."""
    model_state, trainer_state, _ = load_checkpoint(path)
    shards = trainer_state["optimizer_shards"]
    optimizer_state = shards[engine.dp_rank] if engine.plan.zero > 0 else shards[0]
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
