"""An engine's state as checkpoint pieces, and back, under any plan.

Saved per parameter (by its name in the unsplit model): the fp32 weights the
optimizer steps (`model/<name>`) and every optimizer state tensor shaped like
its parameter (`optim/<key>/<name>`), each as this rank's piece with its
layout; scalar optimizer state (Adam's step) as a whole 0-dim tensor.
Buffers and frozen parameters are saved from the module. Loading reads each
of this rank's pieces through its own placement, so dp, ZeRO stage, tp and
pp may all differ from the saving run.

Units whose master and optimizer state live on disk (plait.zero.offload pages)
are saved and loaded a unit at a time: saving brings a unit's pages in,
writes its pieces and frees them; loading fills a unit's master page,
publishes its weights and writes it back, then builds its optimizer state
and pages it. A rank holds at most two units of that state at once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

from plait.amp.scaler import LossScaler
from plait.checkpoint.layout import PieceLayout, RankCoords, layout_of, writes_piece
from plait.checkpoint.sharded import Entry, PagedEntries, ShardReader
from plait.config import AXES, Plan
from plait.distributed.mesh import Mesh
from plait.distributed.placement import Placement, placement_of
from plait.zero.offload.manager import Offload
from plait.zero.offload.pages import Page
from plait.zero.offload.step import page_new_state
from plait.zero.offload.unit_like import UnitLike


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
    offload: Any  # plait.zero.offload.Offload, or None without offload
    steps_done: int


MODEL = "model/"
OPTIM = "optim/"
SCALAR = PieceLayout(global_shape=())


def rank_coords(engine: CheckpointedEngine) -> RankCoords:
    mesh = engine.mesh
    weight_axes = [axis for axis in AXES if axis != "cp"]  # cp ranks are replicas inside dp (plait.distributed.mesh)
    return RankCoords(
        {axis: (mesh.rank(axis), mesh.size(axis)) for axis in (*weight_axes, "ep", "edp", "zshard", "zrep")}
    )


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


def paged_units(engine: CheckpointedEngine) -> list[UnitLike]:
    """This rank's units whose master shard and optimizer state live on disk."""
    offload = getattr(engine, "offload", None)
    units = offload.units if offload is not None else []
    return [unit for unit in units if unit.pages is not None and unit.pages.master is not None]


def _state_pages(unit: UnitLike) -> list[Page]:
    """What a checkpoint reads of a unit: its master shard (ZeRO-3's parameters may be that same page) and
    its optimizer state."""
    assert unit.pages is not None
    return [page for page in (unit.pages.master, unit.pages.moments) if page is not None]


class _EntryMaker:
    """Checkpoint entries of this rank's trainable parameters, and their optimizer-group settings by name."""

    def __init__(self, engine: CheckpointedEngine) -> None:
        self.engine = engine
        self.coords = rank_coords(engine)
        self.names = {id(p): n for n, p in engine.model.named_parameters()}

    def groups(self) -> Iterator[tuple[nn.Parameter, str, dict[str, Any]]]:
        for group in self.engine.optimizer.param_groups:
            settings = {key: value for key, value in group.items() if key != "params"}
            for param in group["params"]:
                yield param, _name_of(param, self.names), settings

    def entries(self, param: nn.Parameter, name: str) -> list[Entry]:
        """`param`'s weights and optimizer state (none where another rank writes this piece)."""
        placement = placement_of(param)
        if not writes_piece(placement, coords=self.coords):
            return []
        layout = layout_of(placement, shape=tuple(param.shape), coords=self.coords)
        state = self.engine.optimizer.state.get(param, {})
        return [Entry(MODEL + name, param.detach(), layout), *_state_entries(name, param, state, layout)]


def state_entries(engine: CheckpointedEngine) -> tuple[list[Entry], dict[str, dict[str, Any]]]:
    """This rank's pieces to write (but those of `paged_units`: see `paged_entries`), and every local
    parameter's optimizer-group settings by name."""
    maker = _EntryMaker(engine)
    paged = {id(piece) for unit in paged_units(engine) for piece in unit.pieces}
    entries: list[Entry] = []
    group_of: dict[str, dict[str, Any]] = {}
    for param, name, settings in maker.groups():
        group_of[name] = settings
        if id(param) not in paged:
            entries += maker.entries(param, name)
    for name, tensor, placement in _unmanaged(engine):
        if writes_piece(placement, coords=maker.coords):
            layout = layout_of(placement, shape=tuple(tensor.shape), coords=maker.coords)
            entries.append(Entry(MODEL + name, tensor.detach(), layout))
    return entries, group_of


def paged_entries(engine: CheckpointedEngine) -> PagedEntries | None:
    """The pieces of `paged_units`, one group per unit, each in memory only while it is written."""
    units = paged_units(engine)
    if not units:
        return None
    maker = _EntryMaker(engine)
    name_of = {id(param): name for param, name, _ in maker.groups()}
    groups = [[e for piece in unit.pieces for e in maker.entries(piece, name_of[id(piece)])] for unit in units]
    return PagedEntries(groups=groups, resident=lambda: _resident(engine.offload, units))


def _resident(offload: Any, units: list[UnitLike]) -> Iterator[int]:
    """Each unit's index while its state pages are in memory (the next unit's are read meanwhile); pages
    that were not resident before are freed after, unwritten (their files are current)."""
    already = {id(page) for unit in units for page in _state_pages(unit) if page.resident}
    for index, unit in enumerate(offload.paged(units, _state_pages)):
        yield index
        for page in _state_pages(unit):
            if id(page) not in already:
                page.evict(write=False)


def _read_into(tensor: torch.Tensor, reader: ShardReader, *, name: str, layout: PieceLayout) -> None:
    tensor.copy_(reader.read(name, layout).view(tensor.shape))


class _PieceReader:
    """Reads this rank's piece of a parameter's checkpoint tensors through its own placement."""

    def __init__(self, engine: CheckpointedEngine, reader: ShardReader) -> None:
        self.reader = reader
        self.coords = rank_coords(engine)
        self.names = {id(p): n for n, p in engine.model.named_parameters()}
        self.keys_of = _optimizer_keys(reader) if reader.names(OPTIM) else {}

    def layout(self, param: torch.Tensor) -> PieceLayout:
        return layout_of(placement_of(param), shape=tuple(param.shape), coords=self.coords)

    def weights_into(self, param: nn.Parameter) -> None:
        _read_into(param, self.reader, name=MODEL + _source_name(param, self.names), layout=self.layout(param))

    def state_of(self, param: nn.Parameter) -> dict[str, torch.Tensor]:
        """The checkpoint's optimizer state of `param`: shaped like it, or 0-dim scalars."""
        name = _source_name(param, self.names)
        state = {}
        for key in self.keys_of.get(name, []):
            full = f"{OPTIM}{key}/{name}"
            is_scalar = self.reader.tensors[full]["shape"] == []
            value = self.reader.read(full, SCALAR if is_scalar else self.layout(param))
            state[key] = value.reshape(()) if is_scalar else value.view(param.shape)
        return state


@torch.no_grad()
def load_weights(engine: CheckpointedEngine, reader: ShardReader) -> None:
    """Every weight this rank holds, from the checkpoint, through its own placement."""
    pieces = _PieceReader(engine, reader)
    paged = paged_units(engine)
    in_pages = {id(piece) for unit in paged for piece in unit.pieces}
    for param in engine.data_parallel.optimizer_params:
        if id(param) not in in_pages:
            pieces.weights_into(param)
    if paged:
        _publish_units(engine, paged, pieces=pieces)
    else:
        engine.data_parallel.after_step()  # masters -> working parameters (cast, re-gather)
    for name, tensor, placement in _unmanaged(engine):
        layout = layout_of(placement, shape=tuple(tensor.shape), coords=pieces.coords)
        _read_into(tensor, reader, name=MODEL + name, layout=layout)


class _WriteBehind:
    """Writes pages back a unit behind: a unit's pages are written while the next unit is filled, then freed,
    so at most two units' pages are in memory and one unit's writes in flight (a slow disk holds the load back
    rather than piling up pages waiting for it)."""

    def __init__(self) -> None:
        self.in_flight: list[Page] = []

    def add(self, pages: list[Page]) -> None:
        for page in pages:
            page.write_through()
        self.finish()
        self.in_flight = pages

    def finish(self) -> None:
        for page in self.in_flight:
            page.evict(write=False)  # waits for its write, then frees it
        self.in_flight = []


def _publish_units(engine: CheckpointedEngine, paged: list[UnitLike], *, pieces: _PieceReader) -> None:
    """Masters -> working parameters unit by unit, a paged unit's master filled from the checkpoint first
    (its page made resident without a read, then written back)."""
    handles = []
    paged_ids = {id(unit) for unit in paged}
    behind = _WriteBehind()
    for index, unit in enumerate(engine.offload.units):
        master = unit.pages.master if id(unit) in paged_ids else None
        if master is not None:
            master.claim()
            unit.master_shard.zero_()  # the padding past the last piece, as a fresh unit has it
            for piece in unit.pieces:
                pieces.weights_into(piece)
        handles.append(unit.publish_step())  # stages 1-2 re-gather: every dp rank, in unit order
        if master is not None:
            engine.offload.observe(f"load-weights:{index}")
            behind.add([master])
    behind.finish()
    for handle in handles:
        if handle is not None:
            handle.wait()


def _optimizer_keys(reader: ShardReader) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = defaultdict(list)
    for full in reader.names(OPTIM):
        key, _, name = full.removeprefix(OPTIM).partition("/")
        keys[name].append(key)
    return keys


def load_optimizer(engine: CheckpointedEngine, reader: ShardReader, *, group_of: dict[str, dict[str, Any]]) -> None:
    """Optimizer state and group settings for this rank's pieces, whatever plan saved them."""
    optimizer = engine.optimizer
    pieces = _PieceReader(engine, reader)
    paged = paged_units(engine)
    in_pages = {id(piece) for unit in paged for piece in unit.pieces}
    state_dict = optimizer.state_dict()
    state_dict["state"] = {}  # what the checkpoint holds replaces any state this optimizer built
    index = 0
    for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"], strict=True):
        for param in group["params"]:
            state = {} if id(param) in in_pages else pieces.state_of(param)
            if state:
                state_dict["state"][index] = state
            index += 1
        sources = (_source_name(p, pieces.names) for p in group["params"])
        settings = next((group_of[n] for n in sources if n in group_of), {})
        saved_group.update({key: value for key, value in settings.items() if key != "params"})
    optimizer.load_state_dict(state_dict)
    behind = _WriteBehind()
    for position, unit in enumerate(paged):
        _load_paged_state(unit, optimizer, pieces=pieces, offload=engine.offload)
        engine.offload.observe(f"load-optimizer:{position}")
        behind.add([unit.pages.moments] if unit.pages.moments is not None else [])
    behind.finish()


def _load_paged_state(
    unit: UnitLike, optimizer: torch.optim.Optimizer, *, pieces: _PieceReader, offload: Offload
) -> None:
    """A paged unit's optimizer state from the checkpoint, in tensors of its own, in a new (resident) page
    that replaces the page of any state this optimizer built."""
    pages = unit.pages
    assert pages is not None
    if pages.moments is not None:  # its tensors are no longer the optimizer's
        pages.moments.discard()
        pages.moments = None
    for piece in unit.pieces:
        state = {key: _own_state(key, value, piece) for key, value in pieces.state_of(piece).items()}
        if state:
            optimizer.state[piece] = state
        else:
            optimizer.state.pop(piece, None)
    page_new_state(offload, unit, optimizer)


def _own_state(key: str, value: torch.Tensor, piece: nn.Parameter) -> torch.Tensor:
    """A state value cast as `Optimizer.load_state_dict` casts it (Adam's `step` stays as saved); a shaped
    one in storage of its own, which its page frees and brings back."""
    if key == "step":
        return value
    return value.to(dtype=piece.dtype, device=piece.device, copy=value.dim() > 0)


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
