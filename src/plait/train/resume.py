"""Save and restore the whole training state of a data-parallel run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist

from plait.checkpoint.io import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from plait.config import Config
from plait.data.loader import ShardedLoader
from plait.dist.launch import is_main_rank
from plait.engine import Engine


def save_training_state(
    path: Path, *, engine: Engine, loader: ShardedLoader, step: int, config: Config, tokenizer_json: str
) -> None:
    """Rank 0 writes (replicas are equal); every rank waits until the checkpoint is complete."""
    if is_main_rank():
        state = engine.state_dict()
        trainer_state = {
            "optimizer": state["optimizer"],
            "scheduler": state["scheduler"],
            "loader": loader.state_dict(),
            "step": step,
            "rng": rng_state(),
            "tokenizer": tokenizer_json,
        }
        save_checkpoint(
            path, model_state=state["model"], trainer_state=trainer_state, config=dataclasses.asdict(config)
        )
    if dist.is_initialized():
        dist.barrier()


def restore(path: Path, *, engine: Engine, loader: ShardedLoader) -> int:
    """Load a checkpoint into the engine and loader; returns the step to continue from."""
    model_state, trainer_state, _ = load_checkpoint(path)
    engine.load_state_dict(
        {"model": model_state, "optimizer": trainer_state["optimizer"], "scheduler": trainer_state["scheduler"]}
    )
    loader.load_state_dict(trainer_state["loader"])
    set_rng_state(trainer_state["rng"])
    return int(trainer_state["step"])
