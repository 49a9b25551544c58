"""Save and restore the whole training state of a run, under any plan.

Every rank writes the pieces it owns (see plait.checkpoint.training_state);
rank 0 adds the run-wide state. A checkpoint loads under another dp, ZeRO
stage, tp or pp: each rank reads its own pieces through its placements, and
the loader resumes at the same sample because its order is global.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.checkpoint.io import (
    CONFIG_FILE,
    TRAINER_FILE,
    config_bytes,
    open_checkpoint,
    read_trainer_state,
    rng_state,
    set_rng_state,
    trainer_bytes,
)
from plait.checkpoint.training_state import (
    adapt_scheduler_state,
    load_optimizer,
    load_weights,
    state_entries,
    tied_names,
)
from plait.checkpoint.writer import CheckpointWriter, SaveRequest
from plait.config import Config, Plan
from plait.data.loader import ShardedLoader
from plait.dist.launch import get_logger, is_main_rank
from plait.engine import Engine

PLAN_KEYS = ("dp", "tp", "pp", "zero", "microbatches", "pp_schedule")


def _gather_to_main(obj: Any) -> list[Any]:
    """Every rank's `obj` in global-rank order on the main rank (others get [])."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size() if is_main_rank() else []
    dist.gather_object(obj, gathered if is_main_rank() else None, dst=0)
    return gathered if is_main_rank() else []


def save_training_state(
    path: Path,
    *,
    engine: Engine,
    loader: ShardedLoader,
    step: int,
    config: Config,
    tokenizer_json: str,
    writer: CheckpointWriter,
    asynchronous: bool = False,
    on_commit: Callable[[Path], None] | None = None,
) -> None:
    """Every rank takes part; with `asynchronous`, returns once the state is copied to host memory.
    `on_commit` runs on the main rank once the checkpoint is in place."""
    entries, group_of = state_entries(engine)
    gathered = _gather_to_main({"rng": rng_state(), "groups": group_of, "aliases": tied_names(engine)})
    request = SaveRequest(path=Path(path), entries=entries, on_commit=on_commit if is_main_rank() else None)
    if is_main_rank():
        trainer_state = {
            "scheduler": engine.scheduler.state_dict() if engine.scheduler else None,
            "scaler": engine.scaler.state_dict(),
            "loader": loader.state_dict(),
            "step": step,
            "rng": [part["rng"] for part in gathered],
            "param_groups": {name: g for part in gathered for name, g in part["groups"].items()},
            "tokenizer": tokenizer_json,
        }
        request.main_files = {
            TRAINER_FILE: trainer_bytes(trainer_state),
            CONFIG_FILE: config_bytes(dataclasses.asdict(config)),
        }
        plan = config.plan
        request.manifest_extra = {
            "step": step,
            "plan": {key: getattr(plan, key) for key in PLAN_KEYS},
            "aliases": {alias: name for part in gathered for alias, name in part["aliases"].items()},
        }
    writer.save(request, asynchronous=asynchronous)


def check_resumable(path: Path, *, config: Config) -> None:
    """Raise, before any rank starts, if the checkpoint cannot continue this run."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"--resume {path}: no {CONFIG_FILE} there; pick a directory under <out_dir>/checkpoints")
    saved = json.loads(config_file.read_text())
    model = dataclasses.asdict(config.model)
    if saved.get("model") != model:
        changed = sorted(k for k in model if saved.get("model", {}).get(k) != model[k])
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


def describe_changes(saved_plan: dict[str, Any], plan: Plan, *, saved_batch: int, global_batch: int) -> list[str]:
    """What differs from the saved run that makes the continuation inexact, for the log."""
    notes = []
    changed = [f"{k} {saved_plan[k]}->{getattr(plan, k)}" for k in PLAN_KEYS if saved_plan.get(k) != getattr(plan, k)]
    if changed:
        notes.append(
            "resharding the checkpoint to the new plan (" + ", ".join(changed) + "); losses match the saved "
            "run's to float rounding (the reductions add in another order)"
        )
    if saved_batch != global_batch:
        notes.append(
            f"global batch {saved_batch} -> {global_batch}: the loader resumes at the same sample, but the steps "
            "group samples differently, so the run is not the continuation of the saved one"
        )
    return notes


def _restore_rng(saved: list[Any]) -> bool:
    """This rank's RNG; a rank count that differs from the saved one gets rank 0's (returns False)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    same = len(saved) == world
    set_rng_state(saved[dist.get_rank() if same and dist.is_initialized() else 0])
    return same


def restore(path: Path, *, engine: Engine, loader: ShardedLoader) -> int:
    """Load a checkpoint (saved under any plan) into the engine and loader; returns its step."""
    reader = open_checkpoint(path)
    trainer_state = read_trainer_state(path)
    load_weights(engine, reader)
    load_optimizer(engine, reader, group_of=trainer_state["param_groups"])
    if engine.scheduler is not None and trainer_state["scheduler"] is not None:
        engine.scheduler.load_state_dict(adapt_scheduler_state(trainer_state["scheduler"], engine.optimizer))
    engine.scaler.load_state_dict(trainer_state["scaler"])
    saved_batch = trainer_state["loader"]["global_batch"]
    loader.load_state_dict(trainer_state["loader"])
    log = get_logger()
    notes = describe_changes(
        reader.manifest.get("plan", {}), engine.plan, saved_batch=saved_batch, global_batch=loader.global_batch
    )
    if not _restore_rng(trainer_state["rng"]):
        notes.append(
            f"{len(trainer_state['rng'])} ranks saved RNG streams, a different number run now: every rank "
            "continues rank 0's stream, so dropout masks differ from an uninterrupted run"
        )
    for note in notes:
        log.warning(f"resume {path}: {note}")
    return int(trainer_state["step"])
