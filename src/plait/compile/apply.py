"""plan.compile: torch.compile of each transformer block ("blocks") or of the whole model or stage ("full").

A unit is compiled by setting its *instance's* ``forward`` to the compiled bound forward
(``module.forward = torch.compile(module.forward)``): ``Module.__call__`` still runs the
module's own hooks around it, so ZeRO-3's gather and release hooks on a block stay outside
the compiled region, and no function or class of torch is replaced. Blocks of one class
share their compiled code: dynamo inlines built-in modules and takes parameters as inputs,
so the second block reuses the first block's graph (recompiles are counted in the report).

Order in the engine: after tensor parallel (the compiled code holds the sliced layers and
their collectives) and after recomputation (the checkpoint runs inside the compiled block,
as torchtitan orders them), before data parallel wraps gradients in hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from plait.compile.available import check_compile_mode
from plait.recompute import find_layer_list


@dataclass(frozen=True)
class CompiledUnits:
    """What plan.compile compiled: the mode and the names of the units."""

    mode: str
    names: tuple[str, ...]
    eager: tuple[str, ...] = ()  # modules inside compiled units that run eagerly: compile boundaries

    def describe(self) -> str:
        text = f"{len(self.names)} unit(s) ({self.mode}: {', '.join(self.names[:2])}{', ...' * (len(self.names) > 2)})"
        return text + (f", {len(self.eager)} collective layer(s) left eager" if self.eager else "")


def compile_module(module: nn.Module) -> None:
    """Compile `module`'s forward in place; its hooks, class and parameter names stay as they were."""
    if "forward" in vars(module):
        raise ValueError(
            f"{type(module).__name__} already has a forward of its own on the instance (compiled twice?); "
            "apply plan.compile once per model"
        )
    module.forward = torch.compile(module.forward)


def compile_blocks(model: nn.Module, *, held: nn.Module | None = None) -> CompiledUnits:
    """Compile each transformer block of `model` (the layer list of plait's architecture registry);
    with `held` (a pipeline rank's stage module), only the blocks this rank runs."""
    list_name, layers = find_layer_list(model)
    mine = {id(module) for module in held.modules()} if held is not None else None
    names = []
    for index, layer in enumerate(layers):
        if mine is not None and id(layer) not in mine:
            continue
        compile_module(layer)
        names.append(f"{list_name}.{index}")
    return CompiledUnits(mode="blocks", names=tuple(names))


def compile_whole(modules: Sequence[nn.Module], *, names: Sequence[str]) -> CompiledUnits:
    """Compile whole modules: the model, or each pipeline stage chunk this rank runs."""
    for module in modules:
        compile_module(module)
    return CompiledUnits(mode="full", names=tuple(names))


def keep_eager(model: nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    """Run the named modules eagerly inside compiled code: dynamo stops its graph before each and
    resumes after it (a graph break by design), so they are the boundaries of the compiled regions.

    Tensor-parallel layers go here: their collectives are autograd Functions around c10d calls
    that also count bytes and start async gathers, which dynamo cannot trace."""
    present = dict(model.named_modules())
    kept = tuple(name for name in names if name in present)
    for name in kept:
        module = present[name]
        module.forward = torch.compiler.disable(module.forward, recursive=True)
    return kept


def apply_compile(
    model: nn.Module,
    *,
    mode: str,
    held: nn.Module | None = None,
    stages: Sequence[nn.Module] = (),
    eager: Sequence[str] = (),
) -> CompiledUnits | None:
    """Compile `model` by plan.compile's `mode`; None for "off". Under a pipeline, `held` is this rank's
    stage module and `stages` its chunks: "blocks" compiles the blocks they hold, "full" each chunk.
    `eager` names modules (of `model`) that stay eager inside the compiled units (see keep_eager)."""
    check_compile_mode(mode)
    if mode == "off":
        return None
    kept = keep_eager(model, eager)
    if mode == "blocks":
        units = compile_blocks(model, held=held)
    elif stages:
        units = compile_whole(stages, names=[f"stage chunk {index}" for index in range(len(stages))])
    else:
        units = compile_whole([model], names=["model"])
    return dataclasses.replace(units, eager=kept)
