"""Checkpoint directories: names, listing and pruning, verification, RNG state, and the
single-process save and load of whole tensors (import, export, generate).

A checkpoint is a directory, `step-000100/`, holding

    shard-RRRRR.safetensors  the pieces each writing rank owns (see sharded.py)
    trainer.pt               scheduler, loss scaler, loader position, step, every rank's RNG
    config.json              the run's configuration
    manifest.json            every tensor's shape, dtype and pieces; sha256 and size of every file

written by `CheckpointWriter` into a hidden directory and renamed into place,
so a crash mid-save never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plait.checkpoint.layout import PieceLayout
from plait.checkpoint.sharded import MANIFEST_FILE, Entry, ShardReader, read_manifest, sha256_of, snapshot
from plait.checkpoint.writer import CheckpointWriter, SaveRequest

TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.json"
MODEL_PREFIX = "model/"
_NAME_PATTERN = re.compile(r"step-(\d+)")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after `step`: 100 -> 'step-000100'."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:06d}"


def _step_of(path: Path) -> int | None:
    match = _NAME_PATTERN.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (`step-N/` with a manifest) in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _step_of(p) is not None and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest step in `directory`, or None when there is none."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints in `directory`; return the deleted paths."""
    if keep < 1:
        raise ValueError(f"prune_checkpoints must keep at least 1 checkpoint, got keep={keep}")
    doomed = list_checkpoints(directory)[:-keep]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from: torch, numpy, Python, CUDA."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by `rng_state()` (CUDA ones only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for index, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, device=index)


def tied_aliases(model_state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names that hold the very same tensor as an earlier name (tied weights): alias -> first name."""
    first: dict[tuple[Any, ...], str] = {}
    aliases = {}
    for name, tensor in model_state.items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if key in first and tensor.numel() > 0:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def trainer_bytes(trainer_state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    return buffer.getvalue()


def config_bytes(config: dict) -> bytes:
    return json.dumps(config, indent=2, sort_keys=True, default=str).encode()


def save_checkpoint(
    path: Path, *, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], config: dict
) -> None:
    """Write a checkpoint of whole tensors from one process, atomically (see the module docstring).

    `trainer_state` should carry "step" (copied into the manifest); anything
    torch.save can pickle is accepted. Tensors that are one tensor under
    several names (tied weights) are stored once and come back under every name.
    """
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"model_state[{name!r}] is a {type(tensor).__name__}, not a tensor; pass model.state_dict()"
            )
    aliases = tied_aliases(model_state)
    entries = [
        Entry(MODEL_PREFIX + name, tensor, PieceLayout(global_shape=tuple(tensor.shape)))
        for name, tensor in model_state.items()
        if name not in aliases
    ]
    request = SaveRequest(
        path=Path(path),
        entries=snapshot(entries),
        main_files={TRAINER_FILE: trainer_bytes(trainer_state), CONFIG_FILE: config_bytes(config)},
        manifest_extra={
            "step": trainer_state.get("step"),
            "aliases": {MODEL_PREFIX + a: MODEL_PREFIX + t for a, t in aliases.items()},
        },
    )
    CheckpointWriter(distributed=False).save(request)


def _earlier_hint(path: Path) -> str:
    earlier = [p for p in list_checkpoints(path.parent) if (_step_of(p) or 0) < (_step_of(path) or 0)]
    return (
        f"resume from an earlier checkpoint such as {earlier[-1]}" if earlier else "resume from an earlier checkpoint"
    )


def complete_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a committed checkpoint; ValueError when there is none (an interrupted save)
    or it is unreadable (a damaged disk or copy), naming the file and an earlier checkpoint."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        raise ValueError(
            f"{path} is not a complete plait checkpoint: {MANIFEST_FILE} is missing; {_earlier_hint(path)}"
        )
    try:
        manifest = read_manifest(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt_manifest(path, f"it is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise _corrupt_manifest(path, "it lacks the table of files every plait manifest holds")
    return manifest


def _corrupt_manifest(path: Path, why: str) -> ValueError:
    return ValueError(f"checkpoint file {path / MANIFEST_FILE} is corrupt: {why}; {_earlier_hint(path)}")


def check_files(path: Path, manifest: dict[str, Any], names: Iterable[str]) -> None:
    """Check the checkpoint files `names` against the manifest's sizes and sha256; ValueError naming a bad one."""
    path = Path(path)
    for name in names:
        expected = manifest["files"][name]
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is missing {name}; {_earlier_hint(path)}")
        if file.stat().st_size != expected["bytes"] or sha256_of(file) != expected["sha256"]:
            raise ValueError(
                f"checkpoint file {file} is corrupt (its size or sha256 differs from {MANIFEST_FILE}); "
                f"{_earlier_hint(path)}"
            )


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return the manifest.

    Raises ValueError naming the missing or corrupt file.
    """
    manifest = complete_manifest(path)
    check_files(path, manifest, manifest["files"])
    return manifest


def open_checkpoint(path: Path) -> ShardReader:
    """Verify a checkpoint's files against its manifest and return a reader of its tensors."""
    return ShardReader(Path(path), verify_checkpoint(path))


def read_trainer_state(path: Path) -> dict[str, Any]:
    # weights_only=False: trainer.pt holds numpy and Python RNG states; it is our own file, checksummed.
    return torch.load(Path(path) / TRAINER_FILE, map_location="cpu", weights_only=False)


def whole_model_state(reader: ShardReader) -> dict[str, torch.Tensor]:
    """Every model tensor whole, tied aliases included (as the same tensor)."""
    state = {name.removeprefix(MODEL_PREFIX): reader.whole(name) for name in reader.names(MODEL_PREFIX)}
    for alias, target in reader.aliases.items():
        if alias.startswith(MODEL_PREFIX):
            state[alias.removeprefix(MODEL_PREFIX)] = state[target.removeprefix(MODEL_PREFIX)]
    return state


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """Verify and read a checkpoint in one process: (whole model state, trainer_state, config).

    Works on a checkpoint written under any plan: the pieces are assembled.
    """
    reader = open_checkpoint(path)
    config = json.loads((Path(path) / CONFIG_FILE).read_text())
    return whole_model_state(reader), read_trainer_state(path), config
