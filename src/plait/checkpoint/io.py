"""Whole-training-state checkpoints for data-parallel runs (every replica equal, rank 0 writes).

A checkpoint is a directory, `step-000100/`, holding

    model.safetensors   the model's tensors (tied weights stored once, aliases in the metadata)
    trainer.pt          optimizer, scheduler, loader state, step, RNG states (torch.save)
    config.json         the run's configuration
    manifest.json       sha256 and size of each file above, plait version, step

It is written into a hidden temporary directory beside it and renamed into
place, so a crash mid-save never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
FORMAT = "plait-replicated-v1"
_ALIASES_KEY = "plait_aliases"
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


def _view_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


def _dedupe_tensors(model_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can store (no shared memory) and the aliases of identical tied tensors."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of_view: dict[tuple[Any, ...], str] = {}
    seen_storages: set[tuple[Any, int]] = set()
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"model_state[{name!r}] is a {type(tensor).__name__}, not a tensor; pass model.state_dict()"
            )
        key = _view_key(tensor)
        if key in first_of_view:
            aliases[name] = first_of_view[key]
            continue
        first_of_view[key] = name
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        # A different view of memory already stored (slices of one flat buffer) gets its own copy.
        shared = storage in seen_storages and tensor.numel() > 0
        seen_storages.add(storage)
        tensors[name] = tensor.detach().clone() if shared else tensor.detach().contiguous()
    return tensors, aliases


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plait_version() -> str:
    import plait  # here, not at import: plait/__init__ may still be importing when this module loads

    return getattr(plait, "__version__", "unknown")


def _write_files(
    directory: Path, *, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], config: dict
) -> None:
    tensors, aliases = _dedupe_tensors(model_state)
    safetensors.torch.save_file(tensors, directory / MODEL_FILE, metadata={_ALIASES_KEY: json.dumps(aliases)})
    torch.save(trainer_state, directory / TRAINER_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    files = {
        name: {"sha256": _sha256(directory / name), "bytes": (directory / name).stat().st_size}
        for name in (MODEL_FILE, TRAINER_FILE, CONFIG_FILE)
    }
    manifest = {"format": FORMAT, "plait_version": _plait_version(), "step": trainer_state.get("step"), "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    for name in (*files, MANIFEST_FILE):
        _fsync(directory / name)
    _fsync(directory)


def _replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`; an existing `target` is moved aside first, then deleted."""
    aside = None
    if target.exists():
        aside = target.parent / f".old-{target.name}-{secrets.token_hex(4)}"
        os.replace(target, aside)
    os.replace(source, target)
    _fsync(target.parent)
    if aside is not None:
        shutil.rmtree(aside)


def save_checkpoint(
    path: Path, *, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], config: dict
) -> None:
    """Write a complete checkpoint directory at `path`, atomically (see the module docstring).

    Call it on one rank only (rank 0): every data-parallel replica holds the same
    state. `trainer_state` should carry "step" (it is copied into the manifest)
    and `rng_state()`; anything torch.save can pickle is accepted. Tensors of the
    model that share memory (tied weights) are stored once and restored under
    every name by `load_checkpoint`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".tmp-{path.name}-{secrets.token_hex(4)}"
    temporary.mkdir()
    try:
        _write_files(temporary, model_state=model_state, trainer_state=trainer_state, config=config)
        _replace_dir(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _earlier_hint(path: Path) -> str:
    earlier = [p for p in list_checkpoints(path.parent) if (_step_of(p) or 0) < (_step_of(path) or 0)]
    return (
        f"resume from an earlier checkpoint such as {earlier[-1]}" if earlier else "resume from an earlier checkpoint"
    )


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return the manifest.

    Raises ValueError naming the missing or corrupt file.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(
            f"{path} is not a complete plait checkpoint: {MANIFEST_FILE} is missing; {_earlier_hint(path)}"
        )
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is missing {name}; {_earlier_hint(path)}")
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise ValueError(
                f"checkpoint file {file} is corrupt (its size or sha256 differs from {MANIFEST_FILE}); "
                f"{_earlier_hint(path)}"
            )
    return manifest


def _load_model_state(file: Path) -> dict[str, torch.Tensor]:
    tensors = safetensors.torch.load_file(file)
    with safetensors.safe_open(file, framework="pt") as handle:
        metadata = handle.metadata() or {}
    for alias, target in json.loads(metadata.get(_ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[target]
    return tensors


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """Verify and read a checkpoint: (model_state, trainer_state, config), tensors on the CPU.

    Tied tensors come back under every name they were saved under, as the same tensor.
    """
    path = Path(path)
    verify_checkpoint(path)
    model_state = _load_model_state(path / MODEL_FILE)
    # weights_only=False: trainer.pt holds numpy and Python RNG states; it is our own file, checksummed above.
    trainer_state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    config = json.loads((path / CONFIG_FILE).read_text())
    return model_state, trainer_state, config
