"""The on-disk form of a sharded checkpoint: one safetensors file per writing rank, one manifest.

Each rank writes the pieces it owns to `shard-RRRRR.safetensors` (a tensor's
key is its checkpoint name: `model/<param>`, `optim/<state>/<param>`),
streamed: the header first (shapes and dtypes are known without the data),
then each tensor's bytes, so state offloaded to disk is written a unit at a
time and never all in memory (`PagedEntries`). The
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
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import safetensors
import safetensors.torch
import torch

from plait.checkpoint.assemble import SourcePiece, assemble, copy_ranges, is_sliced, take_local
from plait.checkpoint.layout import PieceLayout

MANIFEST_FILE = "manifest.json"
FORMAT = "plait-sharded-v1"
_SHARD_PATTERN = re.compile(r"shard-(\d+)\.safetensors")
_BOUNCE_BYTES = 8 * 2**20  # a tensor's bytes go to the file through a buffer of this size
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}


@dataclass
class Entry:
    """One local tensor to save: its checkpoint name, the tensor, and where it sits in the whole."""

    name: str
    tensor: torch.Tensor
    layout: PieceLayout


@dataclass
class PagedEntries:
    """Entries in groups whose tensors are in memory one group at a time (a unit's state offloaded to disk).

    Their shapes and dtypes hold throughout; `resident()` yields each group's index, in order, while that
    group's tensors are in memory, and frees them when resumed.
    """

    groups: list[list[Entry]]
    resident: Callable[[], Iterator[int]]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(entry.tensor) for group in self.groups for entry in group)

    def entries(self) -> list[Entry]:
        return [entry for group in self.groups for entry in group]

    def in_order(self) -> Iterator[list[Entry]]:
        """Each group's entries while its tensors are in memory."""
        for expected, index in enumerate(self.resident()):
            assert index == expected, f"paged groups came out of order ({index} for {expected})"
            yield self.groups[index]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


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


def snapshot_paged(paged: PagedEntries) -> list[Entry]:
    """`snapshot` of every paged group, taken a group at a time (the copies are all held at the end)."""
    return [entry for group in paged.in_order() for entry in snapshot(group)]


def write_rank_file(
    directory: Path,
    *,
    rank: int,
    entries: list[Entry],
    paged: PagedEntries | None = None,
    record_of: Callable[[Path], dict[str, Any]] = file_record,
) -> dict[str, Any]:
    """Write this rank's pieces (`entries`, then `paged` a group at a time); return its record for the
    manifest (empty when it owns none). `record_of(file)` makes the file's record (the writer's also fsyncs it)."""
    every = entries + (paged.entries() if paged is not None else [])
    if not every:
        return {"files": {}, "pieces": []}
    name = shard_file_name(rank)
    with (directory / name).open("wb") as file:
        file.write(safetensors_header(every))
        bounce = torch.empty(_BOUNCE_BYTES, dtype=torch.uint8)
        for entry in entries:
            _write_tensor(file, entry.tensor, bounce=bounce)
        for group in paged.in_order() if paged is not None else []:
            for entry in group:
                _write_tensor(file, entry.tensor, bounce=bounce)
    pieces = [
        {"tensor": e.name, "file": name, "dtype": str(e.tensor.dtype).removeprefix("torch."), **e.layout.to_json()}
        for e in every
    ]
    return {"files": {name: record_of(directory / name)}, "pieces": pieces}


def safetensors_header(entries: list[Entry]) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding `entries`' tensors end to end, in order
    (padded with spaces to 8 bytes, as safetensors writes it)."""
    table: dict[str, Any] = {}
    offset = 0
    for entry in entries:
        tensor = entry.tensor
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"checkpoint tensor {entry.name} has dtype {tensor.dtype}, which safetensors cannot store")
        size = _nbytes(tensor)
        table[entry.name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(table, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _write_tensor(file: BinaryIO, tensor: torch.Tensor, *, bounce: torch.Tensor) -> None:
    """A tensor's bytes through `bounce` (a tensor's own memory never reaches numpy: that would pin the
    storage an offload page must be able to free)."""
    data = tensor.detach().reshape(-1)
    data = (data if data.is_contiguous() else data.contiguous()).view(torch.uint8)
    for lo in range(0, data.numel(), bounce.numel()):
        chunk = data[lo : lo + bounce.numel()]
        bounce[: chunk.numel()].copy_(chunk)
        file.write(memoryview(bounce[: chunk.numel()].numpy()))


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
