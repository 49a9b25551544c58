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

from plait.checkpoint.assemble import SourcePiece, assemble, copy_ranges, is_sliced, take_local
from plait.checkpoint.layout import PieceLayout

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

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.tensors if name.startswith(prefix)]

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = safetensors.safe_open(str(self.path / file), framework="pt")
        return self._handles[file]

    def _sources(self, name: str, info: dict[str, Any]) -> list[SourcePiece]:
        def source(piece: dict[str, Any]) -> SourcePiece:
            handle = self._handle(piece["file"])
            one_dim = len(handle.get_slice(name).get_shape()) == 1
            return SourcePiece(
                layout=PieceLayout.from_json(piece),
                load=lambda: handle.get_tensor(name),
                # a 1-D piece (a ZeRO range) reads just the elements asked for
                load_range=(lambda a, b: handle.get_slice(name)[a:b]) if one_dim else None,
            )

        return [source(piece) for piece in info["pieces"]]

    def whole(self, name: str) -> torch.Tensor:
        """The whole tensor `name` (aliases followed), in its saved dtype and shape."""
        info = self._info(name)
        source = self.aliases.get(name, name)
        what = f"checkpoint {self.path}, tensor {source}"
        return assemble(self._sources(source, info), shape=tuple(info["shape"]), dtype=_dtype(info), what=what)

    def read(self, name: str, layout: PieceLayout) -> torch.Tensor:
        """The piece of tensor `name` a rank with `layout` holds, flattened (zeros where it pads)."""
        info = self._info(name)
        if list(info["shape"]) != list(layout.global_shape):
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(info['shape'])}, but this model's is "
                f"{tuple(layout.global_shape)}; load a checkpoint of the same model"
            )
        source = self.aliases.get(name, name)
        pieces = self._sources(source, info)
        for piece in pieces:  # the same layout as saved: copy it as it is
            if piece.layout == layout:
                return piece.load().reshape(-1)
        what = f"checkpoint {self.path}, tensor {source}"
        if not is_sliced(layout) and not any(is_sliced(piece.layout) for piece in pieces):
            numel = math.prod(layout.global_shape)
            start, stop = layout.flat if layout.flat is not None else (0, numel)
            return copy_ranges(pieces, start=start, stop=stop, dtype=_dtype(info), what=what)
        whole = assemble(pieces, shape=tuple(info["shape"]), dtype=_dtype(info), what=what)
        return take_local(whole, layout)

    def _info(self, name: str) -> dict[str, Any]:
        source = self.aliases.get(name, name)
        if source not in self.tensors:
            raise ValueError(f"checkpoint {self.path} has no tensor {name}; was it saved from this model?")
        return self.tensors[source]


def _dtype(info: dict[str, Any]) -> torch.dtype:
    return getattr(torch, info["dtype"])


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST_FILE).read_text())
