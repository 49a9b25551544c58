"""Save and load an engine's whole training state (the body of `Engine.save` and `Engine.load`).

Every rank writes its own pieces; rank 0 adds the run-wide state to
`trainer.pt`: scheduler, loss scaler, each parameter's optimizer-group
settings, every rank's RNG, and whatever the caller passes in `extra`
(the loop adds the loader position, step and tokenizer).

State offloaded to disk is written a unit at a time from its pages. An
asynchronous save copies it to host memory (a unit at a time) only where
that fits: no plan.memory_budget bounds the state in memory, and this node's
ranks' copies take at most half the memory the host has available; else the
save streams it synchronously and says so in the log.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.checkpoint.io import (
    CONFIG_FILE,
    TRAINER_FILE,
    check_files,
    complete_manifest,
    config_bytes,
    read_trainer_state,
    rng_state,
    set_rng_state,
    trainer_bytes,
)
from plait.checkpoint.sharded import ShardReader, shard_rank
from plait.checkpoint.training_state import (
    CheckpointedEngine,
    adapt_scheduler_state,
    load_optimizer,
    load_weights,
    paged_entries,
    state_entries,
    tied_names,
)
from plait.checkpoint.writer import CheckpointWriter, SaveRequest
from plait.distributed.launch import get_logger, is_main_rank
from plait.sizes import format_bytes

PLAN_KEYS = ("dp", "tp", "pp", "ep", "zero", "microbatches", "pp_schedule", "precision")
PLAN_DEFAULTS = {"ep": 1}  # what a checkpoint written before the key existed ran with


def _gather_to_main(obj: Any) -> list[Any]:
    """Every rank's `obj` in global-rank order on the main rank (others get [])."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size() if is_main_rank() else []
    dist.gather_object(obj, gathered if is_main_rank() else None, dst=0)
    return gathered if is_main_rank() else []


def save_engine(
    engine: CheckpointedEngine,
    path: Path,
    *,
    writer: CheckpointWriter,
    extra: dict[str, Any],
    config: dict[str, Any],
    asynchronous: bool,
    on_commit: Callable[[Path], None] | None,
) -> None:
    entries, group_of = state_entries(engine)
    gathered = _gather_to_main({"rng": rng_state(), "groups": group_of, "aliases": tied_names(engine)})
    request = SaveRequest(path=Path(path), entries=entries, paged=paged_entries(engine))
    if is_main_rank():
        trainer_state = {
            **extra,
            "scheduler": engine.scheduler.state_dict() if engine.scheduler else None,
            "scaler": engine.scaler.state_dict(),
            "rng": [part["rng"] for part in gathered],
            "param_groups": {name: g for part in gathered for name, g in part["groups"].items()},
        }
        request.main_files = {TRAINER_FILE: trainer_bytes(trainer_state), CONFIG_FILE: config_bytes(config)}
        request.manifest_extra = {
            "step": extra.get("step", engine.steps_done),
            "plan": {key: getattr(engine.plan, key) for key in PLAN_KEYS},
            "aliases": {alias: name for part in gathered for alias, name in part["aliases"].items()},
        }
        request.on_commit = on_commit
    if asynchronous and request.paged is not None:
        asynchronous = _paged_copy_fits(engine, request.paged.nbytes, path=path)
    writer.save(request, asynchronous=asynchronous)


def available_host_bytes() -> int | None:
    """The host memory available to new allocations (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _paged_copy_fits(engine: CheckpointedEngine, nbytes: int, *, path: Path) -> bool:
    """Whether an asynchronous save may copy this rank's offloaded state to host memory (else: log why not)."""
    available = available_host_bytes()
    if engine.plan.memory_budget:
        why = f"plan.memory_budget={engine.plan.memory_budget} bounds the state held in memory"
    elif available is None or nbytes * engine.mesh.ranks_per_node > available // 2:
        known = format_bytes(available) if available is not None else "an unknown amount"
        why = f"the node's copies would take more than half the {known} of host memory available"
    else:
        return True
    get_logger().info(
        f"checkpoint {path}: writing synchronously, streaming {format_bytes(nbytes)} of offloaded state per rank "
        f"from disk a unit at a time, since {why} (asynchronous saves copy the state to host memory first)"
    )
    return False


def _restore_rng(saved: list[Any]) -> bool:
    """This rank's RNG; when the rank count differs from the saved one, rank 0's (returns False)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    same = len(saved) == world
    set_rng_state(saved[dist.get_rank() if same and dist.is_initialized() else 0])
    return same


def _auto_precision_note(saved_plan: dict[str, Any], engine: CheckpointedEngine) -> list[str]:
    """One line when plan.precision="auto" picks another precision here than the checkpoint ran in."""
    choice = getattr(engine.mesh, "precision", None)
    saved = saved_plan.get("precision")
    if choice is None or choice.requested != "auto" or saved is None or saved == choice.precision:
        return []
    return [f"trained in {saved}; plan.precision=auto resolves to {choice.precision} here ({choice.reason})"]


def _plan_changes(saved_plan: dict[str, Any], engine: CheckpointedEngine) -> list[str]:
    if not saved_plan:  # written by one process (plait import): nothing to compare
        return []
    notes = _auto_precision_note(saved_plan, engine)
    said = {"precision"} if notes else set()
    changed = [
        f"{k} {saved_plan.get(k, PLAN_DEFAULTS.get(k))}->{getattr(engine.plan, k)}"
        for k in PLAN_KEYS
        if k not in said and saved_plan.get(k, PLAN_DEFAULTS.get(k)) != getattr(engine.plan, k)
    ]
    if not changed:
        return notes
    resharded = (
        "resharded to the new plan (" + ", ".join(changed) + "); losses match the saved run's to float "
        "rounding (reductions add in another order)"
    )
    return [*notes, resharded]


def _load_run_state(engine: CheckpointedEngine, trainer_state: dict[str, Any]) -> list[str]:
    """Schedule, loss scale and RNG where the checkpoint has them (an imported one has weights only)."""
    notes = []
    if engine.scheduler is not None and trainer_state.get("scheduler") is not None:
        engine.scheduler.load_state_dict(adapt_scheduler_state(trainer_state["scheduler"], engine.optimizer))
    if trainer_state.get("scaler") is not None:
        engine.scaler.load_state_dict(trainer_state["scaler"])
    if "rng" in trainer_state and not _restore_rng(trainer_state["rng"]):
        notes.append(
            f"{len(trainer_state['rng'])} ranks saved RNG streams and another number runs now: every rank "
            "continues rank 0's stream, so dropout masks differ from an uninterrupted run"
        )
    return notes


def _files_to_check(names: list[str], *, rank: int, world: int) -> list[str]:
    """This rank's share of a checkpoint's files: the shard files of ranks `rank` mod `world` (the
    pieces it reads next under the same plan, then from the page cache) and every world-th other file."""
    others = sorted(name for name in names if shard_rank(name) is None)
    shards = [name for name in names if (owner := shard_rank(name)) is not None and owner % world == rank]
    return shards + others[rank::world]


def _open_verified(path: Path) -> ShardReader:
    """A reader of a checkpoint whose files the ranks checked between them, each file once (were every
    rank to check every file, each would read the whole checkpoint); every rank raises the same error."""
    manifest = complete_manifest(path)  # every rank sees the same directory: all raise here, or none
    if not dist.is_initialized() or dist.get_world_size() == 1:
        check_files(path, manifest, manifest["files"])
        return ShardReader(path, manifest)
    rank, world = dist.get_rank(), dist.get_world_size()
    problem = None
    try:
        check_files(path, manifest, _files_to_check(list(manifest["files"]), rank=rank, world=world))
    except ValueError as error:
        problem = str(error)
    problems: list[Any] = [None] * world
    dist.all_gather_object(problems, problem)
    found = [p for p in problems if p is not None]
    if found:
        raise ValueError(found[0])
    return ShardReader(path, manifest)


def load_engine(engine: CheckpointedEngine, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Load a checkpoint saved under any plan; returns its trainer state and notes on what
    makes the continuation inexact (for the log)."""
    reader = _open_verified(Path(path))
    trainer_state = read_trainer_state(path)
    load_weights(engine, reader)
    notes = _plan_changes(reader.manifest.get("plan", {}), engine)
    if "param_groups" in trainer_state:
        load_optimizer(engine, reader, group_of=trainer_state["param_groups"])
    else:
        notes.append("the checkpoint holds weights only (no optimizer state): the optimizer starts afresh")
    notes += _load_run_state(engine, trainer_state)
    engine.steps_done = int(trainer_state.get("step") or 0)
    return trainer_state, notes
