"""An engine's state as checkpoint pieces, and back, under any plan.

Saved per parameter (by its name in the unsplit model): the fp32 weights the
optimizer steps (`model/<name>`) and every optimizer state tensor shaped like
its parameter (`optim/<key>/<name>`), each as this rank's piece with its
layout; scalar optimizer state (Adam's step) as a whole 0-dim tensor.
Buffers and frozen parameters are saved from the module. Loading reads each
of this rank's pieces through its own placement, so dp, ZeRO stage, tp and
pp may all differ from the saving run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

from plait.amp.scaler import LossScaler
from plait.checkpoint.layout import PieceLayout, RankCoords, layout_of, writes_piece
from plait.checkpoint.sharded import Entry, ShardReader
from plait.config import AXES, Plan
from plait.distributed.mesh import Mesh
from plait.distributed.placement import Placement, placement_of


class DataParallelState(Protocol):
    """What a checkpoint reads of the engine's data-parallel wrapper (plain DP or ZeRO)."""

    @property
    def optimizer_params(self) -> list[nn.Parameter]: ...

    def after_step(self) -> None: ...


class CheckpointedEngine(Protocol):
    """What saving and loading read and write of an engine; `plait.Engine` is one.

    A protocol, not the class, so the engine may import checkpoints without a cycle.
    """

    mesh: Mesh
    plan: Plan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler with state_dict/load_state_dict, or None
    scaler: LossScaler
    pipeline: Any  # the pipeline build, or None without pipeline parallel
    data_parallel: DataParallelState
    steps_done: int


MODEL = "model/"
OPTIM = "optim/"
SCALAR = PieceLayout(global_shape=())


def rank_coords(engine: CheckpointedEngine) -> RankCoords:
    mesh = engine.mesh
    return RankCoords({axis: (mesh.rank(axis), mesh.size(axis)) for axis in AXES})


def _name_of(param: torch.Tensor, names: dict[int, str]) -> str:
    placement = placement_of(param)
    return placement.name if placement is not None else names[id(param)]


def _source_name(param: nn.Parameter, names: dict[int, str]) -> str:
    placement = placement_of(param)
    return placement.tied_to if placement is not None and placement.tied_to else _name_of(param, names)


def _unmanaged(engine: CheckpointedEngine) -> list[tuple[str, torch.Tensor, Placement | None]]:
    """Module state the optimizer does not step (buffers, frozen parameters)."""
    trainable = {id(p) for p in engine.model.parameters() if p.requires_grad}
    out = []
    for name, tensor in engine.model.state_dict(keep_vars=True).items():
        if id(tensor) in trainable:
            continue
        placement = placement_of(tensor)
        if engine.pipeline is not None:  # each stage holds its own
            placement = replace(placement or Placement(name=name, global_shape=tuple(tensor.shape)), stage_axes=("pp",))
        out.append((name, tensor, placement))
    return out


def tied_names(engine: CheckpointedEngine) -> dict[str, str]:
    """Checkpoint aliases this rank knows: a second name of one parameter, or a pipeline stage's
    synchronised copy of a tied weight -> the name its values are saved under."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in engine.model.state_dict(keep_vars=True).items():
        placement = placement_of(tensor)
        if placement is not None and placement.tied_to:
            aliases[MODEL + name] = MODEL + placement.tied_to
        elif id(tensor) in first:
            aliases[MODEL + name] = MODEL + first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _state_entries(name: str, param: torch.Tensor, state: dict[str, Any], layout: PieceLayout) -> list[Entry]:
    entries = []
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0:
            entries.append(Entry(f"{OPTIM}{key}/{name}", value.detach(), layout))
        elif (torch.is_tensor(value) and value.numel() == 1) or isinstance(value, int | float):
            entries.append(Entry(f"{OPTIM}{key}/{name}", torch.as_tensor(value).reshape(()), SCALAR))
        else:
            raise ValueError(
                f"optimizer state {key!r} of {name} is neither shaped like its parameter nor a scalar; plait "
                "checkpoints reshard per-element and scalar state only (Adam, AdamW, SGD, LAMB, LARS)"
            )
    return entries


def state_entries(engine: CheckpointedEngine) -> tuple[list[Entry], dict[str, dict[str, Any]]]:
    """This rank's pieces to write, and every local parameter's optimizer-group settings by name."""
    coords = rank_coords(engine)
    names = {id(p): n for n, p in engine.model.named_parameters()}
    entries: list[Entry] = []
    group_of: dict[str, dict[str, Any]] = {}
    for group in engine.optimizer.param_groups:
        settings = {key: value for key, value in group.items() if key != "params"}
        for param in group["params"]:
            name = _name_of(param, names)
            group_of[name] = settings
            placement = placement_of(param)
            if not writes_piece(placement, coords=coords):
                continue
            layout = layout_of(placement, shape=tuple(param.shape), coords=coords)
            entries.append(Entry(MODEL + name, param.detach(), layout))
            entries += _state_entries(name, param, engine.optimizer.state.get(param, {}), layout)
    for name, tensor, placement in _unmanaged(engine):
        if writes_piece(placement, coords=coords):
            entries.append(
                Entry(MODEL + name, tensor.detach(), layout_of(placement, shape=tuple(tensor.shape), coords=coords))
            )
    return entries, group_of


def _read_into(tensor: torch.Tensor, reader: ShardReader, *, name: str, layout: PieceLayout) -> None:
    tensor.copy_(reader.read(name, layout).view(tensor.shape))


@torch.no_grad()
def load_weights(engine: CheckpointedEngine, reader: ShardReader) -> None:
    """Every weight this rank holds, from the checkpoint, through its own placement."""
    coords = rank_coords(engine)
    names = {id(p): n for n, p in engine.model.named_parameters()}
    for param in engine.data_parallel.optimizer_params:
        placement = placement_of(param)
        source = _source_name(param, names)
        layout = layout_of(placement, shape=tuple(param.shape), coords=coords)
        _read_into(param, reader, name=MODEL + source, layout=layout)
    engine.data_parallel.after_step()  # masters -> working parameters (cast, re-gather)
    for name, tensor, placement in _unmanaged(engine):
        _read_into(
            tensor, reader, name=MODEL + name, layout=layout_of(placement, shape=tuple(tensor.shape), coords=coords)
        )


def _optimizer_keys(reader: ShardReader) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = defaultdict(list)
    for full in reader.names(OPTIM):
        key, _, name = full.removeprefix(OPTIM).partition("/")
        keys[name].append(key)
    return keys


def load_optimizer(engine: CheckpointedEngine, reader: ShardReader, *, group_of: dict[str, dict[str, Any]]) -> None:
    """Optimizer state and group settings for this rank's pieces, whatever plan saved them."""
    optimizer = engine.optimizer
    coords = rank_coords(engine)
    names = {id(p): n for n, p in engine.model.named_parameters()}
    keys_of = _optimizer_keys(reader)
    state_dict = optimizer.state_dict()
    state_dict["state"] = {}  # what the checkpoint holds replaces any state this optimizer built
    index = 0
    for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"], strict=True):
        for param in group["params"]:
            placement = placement_of(param)
            name = _source_name(param, names)
            layout = layout_of(placement, shape=tuple(param.shape), coords=coords)
            state = {}
            for key in keys_of.get(name, []):
                full = f"{OPTIM}{key}/{name}"
                is_scalar = reader.tensors[full]["shape"] == []
                value = reader.read(full, SCALAR if is_scalar else layout)
                state[key] = value.reshape(()) if is_scalar else value.view(param.shape)
            if state:
                state_dict["state"][index] = state
            index += 1
        sources = (_source_name(p, names) for p in group["params"])
        settings = next((group_of[n] for n in sources if n in group_of), {})
        saved_group.update({key: value for key, value in settings.items() if key != "params"})
    optimizer.load_state_dict(state_dict)


def adapt_scheduler_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A scheduler's saved state with its per-group lists rebuilt for this optimizer's groups
    (a rank's group count may differ under another plan: a rank can hold no vector parameter)."""
    state = dict(saved)
    groups = optimizer.param_groups
    if "base_lrs" in state:
        state["base_lrs"] = [group.get("initial_lr", group["lr"]) for group in groups]
    if "_last_lr" in state:
        state["_last_lr"] = [group["lr"] for group in groups]
    if "lr_lambdas" in state and all(item is None for item in state["lr_lambdas"]):
        state["lr_lambdas"] = [None] * len(groups)
    return state
