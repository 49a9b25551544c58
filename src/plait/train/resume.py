"""Save and restore the whole state of a `plait train` run, under any plan.

The engine saves and loads model, optimizer, schedule, loss scale and RNG
(see plait.checkpoint.engine_state); the run adds the loader position, the
step and the tokenizer. The loader resumes at the same sample under any dp
because its order is global.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.checkpoint.io import CONFIG_FILE
from plait.config import Config
from plait.data.loader import ShardedLoader
from plait.distributed.launch import get_logger, is_main_rank
from plait.engine import Engine


def save_training_state(
    path: Path,
    *,
    engine: Engine,
    loader: ShardedLoader,
    step: int,
    config: Config,
    tokenizer_json: str,
    extra: dict[str, Any] | None = None,
    asynchronous: bool = False,
    on_commit: Callable[[Path], None] | None = None,
) -> None:
    """Every rank takes part; with `asynchronous`, returns once the state is copied to host memory.
    `extra` adds entries to the trainer state (a pretrained run's transformers config and tokenizer).
    `on_commit` runs on the main rank once the checkpoint is in place."""
    engine.save(
        path,
        extra={**(extra or {}), "loader": loader.state_dict(), "step": step, "tokenizer": tokenizer_json},
        config=dataclasses.asdict(config),
        asynchronous=asynchronous,
        on_commit=on_commit,
    )


def check_resumable(path: Path, *, config: Config) -> None:
    """Raise, before any rank starts, if the checkpoint cannot continue this run (another plan can)."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"--resume {path}: no {CONFIG_FILE} there; pick a directory under <out_dir>/checkpoints")
    saved = json.loads(config_file.read_text())
    model = dataclasses.asdict(config.model)
    changed = sorted(k for k in model if saved.get("model", {}).get(k) != model[k])  # absent keys: None
    if changed:
        raise ValueError(
            f"--resume {path}: the checkpoint holds another model (model.{', model.'.join(changed)} differ); "
            "resume with the checkpoint's [model] section"
        )
    saved_fp16, fp16 = saved["plan"].get("precision") == "fp16", config.plan.precision == "fp16"
    if saved_fp16 != fp16:
        raise ValueError(
            f"--resume {path}: saved with precision={saved['plan'].get('precision')}, this run uses "
            f"{config.plan.precision}; fp16's loss scale does not carry over: resume with the same precision family"
        )


def restore(path: Path, *, engine: Engine, loader: ShardedLoader) -> int:
    """Load a checkpoint (saved under any plan) into the engine and loader; returns its step."""
    trainer_state, notes = engine.load(path)
    if "loader" not in trainer_state:
        notes.append("no loader position in the checkpoint: the data starts from the beginning")
    elif trainer_state["loader"]["global_batch"] != loader.global_batch:
        saved_batch = trainer_state["loader"]["global_batch"]
        notes.append(
            f"global batch {saved_batch} -> {loader.global_batch}: the loader resumes at the same sample, but "
            "steps group samples differently, so this is not the saved run's continuation"
        )
    if "loader" in trainer_state:
        loader.load_state_dict(trainer_state["loader"])
    for note in notes if is_main_rank() else []:
        get_logger().warning(f"resume {path}: {note}")
    return int(trainer_state.get("step") or 0)
