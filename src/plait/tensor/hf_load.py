"""Fill a meta-device, tensor-parallel model from safetensors, reading only this rank's slices.

Each parameter's placement record says which dim is split and how (state.py's rules): a fused
tensor's segments are split one by one; otherwise rows are split in chunks of ceil(n / tp), the
last one zero-padded (vocabularies). `safe_open(...).get_slice(key)[...]` reads just that range.
Buffers are rebuilt by the model's own `_init_weights` (rotary `inv_freq`, BERT's `position_ids`),
or read from the file when they are persistent and stored there.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from plait.distributed.placement import Placement, placement_of
from plait.tensor.hf_expert_keys import file_spellings, per_expert_keys


@dataclass
class ReadStats:
    """What one rank read from the checkpoint files (tensor bytes, before any dtype cast)."""

    bytes_read: int = 0
    sharded_bytes: int = 0  # of bytes_read, the slices of tp-sharded tensors
    tensors_read: int = 0

    def add(self, tensor: torch.Tensor, *, sharded: bool) -> None:
        size = tensor.numel() * tensor.element_size()
        self.bytes_read += size
        self.sharded_bytes += size if sharded else 0
        self.tensors_read += 1


def build_on_meta(model_cls: Any, config: Any) -> nn.Module:
    """`model_cls` (an HF model class or an Auto class) built from `config`, every tensor on meta."""
    with torch.device("meta"):
        if hasattr(model_cls, "from_config"):  # AutoModel, AutoModelForCausalLM, ...
            return model_cls.from_config(config)
        return model_cls(config)


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor: a file, or a directory (single file or index)."""
    path = Path(path)
    if path.is_file():
        return dict.fromkeys(_keys(path), path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: path / name for key, name in weight_map.items()}
    single = path / "model.safetensors"
    if single.exists():
        return dict.fromkeys(_keys(single), single)
    raise ValueError(
        f"{path} holds no model.safetensors or model.safetensors.index.json; load_pretrained_tp reads "
        "safetensors only (save the checkpoint with save_pretrained(..., safe_serialization=True))"
    )


def _keys(file: Path) -> list[str]:
    with safe_open(file, "pt") as handle:
        return list(handle.keys())


def materialize(
    model: nn.Module, files: dict[str, Path], *, rank: int, size: int, device: torch.device, stats: ReadStats
) -> None:
    """Give every meta parameter and buffer of `model` real storage on `device`, from `files`."""
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def open_file(file: Path) -> Any:
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, "pt", device="cpu"))
            return handles[file]

        reader = _Reader(model, files, open_file=open_file, rank=rank, size=size, stats=stats)
        _materialize_buffers(model, reader, device=device)
        _materialize_parameters(model, reader, device=device)


class _Reader:
    """Finds a model tensor's key in the files (tied aliases, base-model prefix) and reads its slice."""

    def __init__(
        self, model: nn.Module, files: dict[str, Path], *, open_file: Any, rank: int, size: int, stats: ReadStats
    ) -> None:
        self.files = files
        self.open_file = open_file
        self.rank, self.size, self.stats = rank, size, stats
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def key_of(self, names: list[str]) -> str | None:
        """The file's key for a tensor known by `names` (tied aliases); checkpoints of a base model
        lack the task model's prefix ("bert."), and the other way round."""
        for spelling in (spelling for name in names for spelling in file_spellings(name)):
            prefix = self.prefix
            keys = (spelling, f"{prefix}.{spelling}", spelling.removeprefix(f"{prefix}.")) if prefix else (spelling,)
            found = next((key for key in keys if key in self.files), None)
            if found is not None:
                return found
        return None

    def read(self, key: str, placement: Placement | None, *, expected: tuple[int, ...]) -> torch.Tensor:
        handle = self.open_file(self.files[key])
        slice_ = handle.get_slice(key)  # reads nothing until indexed
        shape = tuple(slice_.get_shape())
        if shape != expected:
            raise ValueError(f"{key}: the checkpoint holds shape {shape} but the model expects {expected}")
        sharded = _tp_dim(placement) is not None  # a partial-gradient record (norms) holds the whole tensor
        tensor = _read_shard(slice_, placement, rank=self.rank, size=self.size) if sharded else handle.get_tensor(key)
        self.stats.add(tensor, sharded=sharded)
        return tensor

    def read_whole(self, key: str) -> torch.Tensor:
        tensor = self.open_file(self.files[key]).get_tensor(key)
        self.stats.add(tensor, sharded=False)
        return tensor


def _tp_dim(placement: Placement | None) -> int | None:
    return next((dim for axis, dim in placement.dim_shards if axis == "tp"), None) if placement else None


def _read_shard(slice_: Any, placement: Placement, *, rank: int, size: int) -> torch.Tensor:
    """This rank's shard, read range by range (the inverse of state.gather_tp_tensor)."""
    dim = _tp_dim(placement)
    assert dim is not None, f"{placement.name} is not split over tp"

    def rows(start: int, stop: int) -> torch.Tensor:
        return slice_[(slice(None),) * dim + (slice(start, stop),)]

    if placement.segments:
        offsets = [sum(placement.segments[:i]) for i in range(len(placement.segments))]
        pieces = [
            rows(o + rank * (s // size), o + (rank + 1) * (s // size))
            for o, s in zip(offsets, placement.segments, strict=True)
        ]
        return torch.cat(pieces, dim=dim)
    total = placement.global_shape[dim]
    per_rank = -(-total // size)
    start = rank * per_rank
    local = rows(start, min(start + per_rank, total))
    missing = per_rank - local.shape[dim]
    if missing == 0:
        return local
    pad_shape = list(local.shape)
    pad_shape[dim] = missing  # vocabulary padding on the last rank, as VocabParallelEmbedding holds it
    return torch.cat([local, local.new_zeros(pad_shape)], dim=dim)


def _materialize_parameters(model: nn.Module, reader: _Reader, *, device: torch.device) -> None:
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    loaded: dict[int, nn.Parameter] = {}  # tied parameters are read once and stay tied
    missing = []
    for module_name, module in model.named_modules():
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in loaded:
                key = reader.key_of(aliases[id(param)])
                if key is not None:
                    filled = _filled(param, reader, key=key, device=device)
                else:
                    filled = _stacked_experts(param, aliases[id(param)], reader, device=device)
                if filled is None:
                    missing.append(f"{module_name}.{attr}".lstrip("."))
                    continue
                loaded[id(param)] = filled
            setattr(module, attr, loaded[id(param)])
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} of the model's parameters (first: {missing[:3]}); "
            "check that the model class matches the checkpoint's architecture"
        )


def _filled(param: nn.Parameter, reader: _Reader, *, key: str, device: torch.device) -> nn.Parameter:
    placement = placement_of(param)
    expected = placement.global_shape if placement is not None else tuple(param.shape)
    # a row-parallel slice is a strided view of the columns read: pack it (checkpoints and optimizers want that)
    data = reader.read(key, placement, expected=tuple(expected)).to(device=device, dtype=param.dtype).contiguous()
    new = nn.Parameter(data, requires_grad=param.requires_grad)
    new.__dict__.update(param.__dict__)  # the placement record, and any flags HF set
    return new


def _stacked_experts(
    param: nn.Parameter, names: list[str], reader: _Reader, *, device: torch.device
) -> nn.Parameter | None:
    """A stacked expert parameter put together from a checkpoint's per-expert tensors (see hf_expert_keys)."""
    groups = next((found for found in (per_expert_keys(name, reader.files) for name in names) if found), None)
    if groups is None:
        return None
    assert _tp_dim(placement_of(param)) is None, f"{names[0]} is split over tp; experts are kept whole"
    data = torch.stack([torch.cat([reader.read_whole(key) for key in keys]) for keys in groups])
    if tuple(data.shape) != tuple(param.shape):
        raise ValueError(
            f"{names[0]}: the checkpoint's {len(groups)} experts make shape {tuple(data.shape)} but the model "
            f"expects {tuple(param.shape)}; pass the config the checkpoint was saved with"
        )
    new = nn.Parameter(data.to(device=device, dtype=param.dtype), requires_grad=param.requires_grad)
    new.__dict__.update(param.__dict__)
    return new


def _materialize_buffers(model: nn.Module, reader: _Reader, *, device: torch.device) -> None:
    """Persistent buffers stored in the file are read; the rest are rebuilt by the model's `_init_weights`."""
    to_init: list[tuple[str, nn.Module, Any]] = []
    for name, module, owner in _modules_with_init_owner(model):
        for attr, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            full = f"{name}.{attr}".lstrip(".")
            key = reader.key_of([full]) if attr not in module._non_persistent_buffers_set else None
            if key is not None:
                module._buffers[attr] = reader.read(key, None, expected=tuple(buffer.shape)).to(device, buffer.dtype)
                continue
            module._buffers[attr] = _sentinel_like(buffer, device=device)
            if not to_init or to_init[-1][1] is not module:
                to_init.append((name, module, owner))
    with torch.no_grad():
        for name, module, owner in to_init:
            if owner is None:
                raise ValueError(f"{name or 'the model'} has buffers but no Hugging Face _init_weights rebuilds them")
            owner._init_weights(module)
            _check_initialised(name, module, owner)


def _modules_with_init_owner(model: nn.Module) -> list[tuple[str, nn.Module, Any]]:
    """(name, module, the nearest enclosing model whose `_init_weights` knows that module)."""
    out = []

    def visit(prefix: str, module: nn.Module, owner: Any) -> None:
        owner = module if hasattr(module, "_init_weights") else owner
        out.append((prefix, module, owner))
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}".lstrip("."), child, owner)

    visit("", model, None)
    return out


def _sentinel_like(buffer: torch.Tensor, *, device: torch.device) -> torch.Tensor:
    """Storage for a buffer, filled so that an init that skipped it shows (NaN, or the lowest integer)."""
    if buffer.dtype.is_floating_point or buffer.dtype.is_complex:
        return torch.full(buffer.shape, float("nan"), dtype=buffer.dtype, device=device)
    if buffer.dtype == torch.bool:
        return torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
    return torch.full(buffer.shape, torch.iinfo(buffer.dtype).min, dtype=buffer.dtype, device=device)


def _check_initialised(name: str, module: nn.Module, owner: Any) -> None:
    for attr, buffer in module._buffers.items():
        if buffer is None or buffer.dtype == torch.bool:
            continue
        sentinel = _sentinel_like(buffer.new_empty(()), device=buffer.device)
        if buffer.numel() and bool((buffer == sentinel).all() | torch.isnan(buffer).any()):
            raise ValueError(
                f"buffer {name}.{attr} is neither in the checkpoint nor rebuilt by {type(owner).__name__}._init_weights; "
                "load this model with from_pretrained and plait.boost instead"
            )
