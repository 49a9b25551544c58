"""Checkpoints: whole-training-state save and load under any plan, and Hugging Face import/export."""

from plait.checkpoint.io import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)

__all__ = [
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]
