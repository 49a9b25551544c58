"""The on-disk form of a sharded checkpoint: one safetensors file per writing rank, one manifest.

Each rank writes the pieces it owns to `shard-RRRRR.safetensors` (a tensor's
key is its checkpoint name: `model/<param>`, `optim/<state>/<param>`). The
manifest lists, per checkpoint tensor, its whole shape and dtype and every
piece with its file and `PieceLayout`. Reading a tensor under another plan
scatters the overlapping pieces into the whole tensor by their global
indices and gathers the reader's own piece back out of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from plait.checkpoint.layout import PieceLayout, global_indices

MANIFEST_FILE = "manifest.json"
FORMAT = "plait-sharded-v1"
_SHARD_PATTERN = re.compile(r"shard-(\d+)\.safetensors")


@dataclass
class Entry:
    """One local tensor to save: its checkpoint name, the tensor, and where it sits in the whole."""

    name: str
    tensor: torch.Tensor
    layout: PieceLayout


def plait_version() -> str:
    import plait  # here, not at import: plait/__init__ may still be importing when this module loads

    return getattr(plait, "__version__", "unknown")


def shard_file_name(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def shard_rank(file_name: str) -> int | None:
    """The writing rank of a shard file's name ('shard-00003.safetensors' -> 3); None for other files."""
    match = _SHARD_PATTERN.fullmatch(file_name)
    return int(match.group(1)) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size}


def snapshot(entries: list[Entry]) -> list[Entry]:
    """Private contiguous CPU copies, so training may go on changing the originals (and
    safetensors, which refuses tensors sharing memory, can store views of one flat buffer)."""
    return [Entry(e.name, e.tensor.detach().to("cpu", copy=True).contiguous(), e.layout) for e in entries]


def write_rank_file(
    directory: Path, *, rank: int, entries: list[Entry], record_of: Callable[[Path], dict[str, Any]] = file_record
) -> dict[str, Any]:
    """Write this rank's pieces; return its record for the manifest (empty when it owns none).

    `record_of(file)` makes the file's record (the writer's also fsyncs it)."""
    if not entries:
        return {"files": {}, "pieces": []}
    name = shard_file_name(rank)
    safetensors.torch.save_file({e.name: e.tensor for e in entries}, directory / name)
    pieces = [
        {"tensor": e.name, "file": name, "dtype": str(e.tensor.dtype).removeprefix("torch."), **e.layout.to_json()}
        for e in entries
    ]
    return {"files": {name: record_of(directory / name)}, "pieces": pieces}


def tensor_table(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every checkpoint tensor: whole shape, dtype and its pieces, from all ranks' records."""
    table: dict[str, dict[str, Any]] = {}
    for record in records:
        for piece in record["pieces"]:
            entry = table.setdefault(
                piece["tensor"], {"shape": piece["global_shape"], "dtype": piece["dtype"], "pieces": []}
            )
            if list(entry["shape"]) != list(piece["global_shape"]):
                raise AssertionError(f"ranks disagree on the shape of {piece['tensor']}")
            entry["pieces"].append({k: v for k, v in piece.items() if k not in ("tensor", "dtype")})
    return table


class ShardReader:
    """Reads checkpoint tensors, whole or as any rank's piece, from a verified checkpoint directory."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.tensors: dict[str, dict[str, Any]] = manifest["tensors"]
        self.aliases: dict[str, str] = manifest.get("aliases", {})
        self._handles: dict[str, Any] = {}
        self._indices: dict[tuple[str, int], torch.Tensor] = {}

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.tensors if name.startswith(prefix)]

    def _raw(self, file: str, key: str) -> torch.Tensor:
        if file not in self._handles:
            self._handles[file] = safetensors.safe_open(str(self.path / file), framework="pt")
        return self._handles[file].get_tensor(key)

    def _piece_indices(self, name: str, position: int, layout: PieceLayout) -> torch.Tensor:
        key = (name, position)
        if key not in self._indices:
            self._indices[key] = global_indices(layout)
        return self._indices[key]

    def whole(self, name: str) -> torch.Tensor:
        """The whole tensor `name` (aliases followed), in its saved dtype and shape."""
        info = self._info(name)
        return self._assemble(self.aliases.get(name, name), info, wanted=None).view(info["shape"])

    def read(self, name: str, layout: PieceLayout) -> torch.Tensor:
        """The piece of tensor `name` a rank with `layout` holds, flattened (zeros where it pads)."""
        info = self._info(name)
        if list(info["shape"]) != list(layout.global_shape):
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(info['shape'])}, but this model's is "
                f"{tuple(layout.global_shape)}; load a checkpoint of the same model"
            )
        name = self.aliases.get(name, name)
        for piece in info["pieces"]:  # the same layout as saved: copy it as it is
            if PieceLayout.from_json(piece) == layout:
                return self._raw(piece["file"], name).reshape(-1)
        wanted = global_indices(layout)
        whole = self._assemble(name, info, wanted=wanted)
        out = whole[wanted.clamp(min=0)]
        out[wanted < 0] = 0
        return out

    def _info(self, name: str) -> dict[str, Any]:
        source = self.aliases.get(name, name)
        if source not in self.tensors:
            raise ValueError(f"checkpoint {self.path} has no tensor {name}; was it saved from this model?")
        return self.tensors[source]

    def _assemble(self, name: str, info: dict[str, Any], *, wanted: torch.Tensor | None) -> torch.Tensor:
        """The whole tensor, flat, from the pieces that overlap `wanted` (all pieces when None)."""
        numel = math.prod(info["shape"])
        whole = torch.zeros(numel, dtype=getattr(torch, info["dtype"]))
        covered = torch.zeros(numel, dtype=torch.bool)
        valid = wanted[wanted >= 0] if wanted is not None else None
        low, high = (int(valid.min()), int(valid.max())) if valid is not None and valid.numel() else (0, numel - 1)
        for position, piece in enumerate(info["pieces"]):
            indices = self._piece_indices(name, position, PieceLayout.from_json(piece))
            mine = indices >= 0
            if not mine.any() or indices[mine].max() < low or indices[mine].min() > high:
                continue
            data = self._raw(piece["file"], name).reshape(-1)
            whole[indices[mine]] = data[mine]
            covered[indices[mine]] = True
        needed = covered[valid] if valid is not None else covered
        if not bool(needed.all()):
            raise ValueError(
                f"checkpoint {self.path} lacks part of tensor {name} ({int((~needed).sum())} elements); "
                "its manifest and shard files disagree: save it again"
            )
        return whole


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST_FILE).read_text())
