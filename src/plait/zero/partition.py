"""Which parameters form a unit, and which modules use which units.

A unit is the parameter set gathered and released together under ZeRO-3,
and the grain of gradient reduction at every stage: each layer of a layer
list (a ModuleList) is one unit, every other child with parameters is one,
and parameters held directly by a module that contains a layer list form a
unit of their own that lives across that module's whole forward.

Expert parameters (expert parallel) are reduced and sharded over another group
than the rest: a module's expert parameters form a unit of their own, next to
its other parameters' unit.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from torch import nn


@dataclass
class UnitSpec:
    name: str
    module: nn.Module
    named_params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    expert: bool = False  # expert-parallel parameters: reduced and sharded over the edp group


@dataclass
class HookSite:
    """A module whose forward needs the parameters of `unit_indices`."""

    name: str
    module: nn.Module
    unit_indices: list[int]


def _is_container(module: nn.Module) -> bool:
    """A layer list, or a bare ``nn.Module`` that only holds children (a pipeline stage's merged tree):
    neither has a forward of its own, so their children are the units and the hook sites."""
    return isinstance(module, nn.ModuleList) or type(module) is nn.Module


def _contains_layer_list(module: nn.Module) -> bool:
    return any(_is_container(m) for m in module.modules())


def _candidates(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, direct_only) in registration order; direct_only: only the module's own parameters."""
    if not _contains_layer_list(module):
        return [(prefix, module, False)]
    out = [(prefix, module, True)]
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if _is_container(child):
            for index, item in child.named_children():
                out += _candidates(item, f"{path}.{index}")
        else:
            out += _candidates(child, path)
    return out


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def plan_units(
    model: nn.Module, *, expert_params: Collection[nn.Parameter] = ()
) -> tuple[list[UnitSpec], list[HookSite]]:
    """Units (each parameter in exactly one, by identity) and the modules that use them;
    `expert_params` go to units of their own (`UnitSpec.expert`)."""
    experts = {id(p) for p in expert_params}
    owner: dict[int, int] = {}
    units: list[UnitSpec] = []
    sites: list[HookSite] = []
    for prefix, module, direct_only in _candidates(model, ""):
        named = list(module.named_parameters(recurse=not direct_only))
        name = prefix or "<root>"
        for spec in (UnitSpec(name=name, module=module), UnitSpec(name=f"{name}[experts]", module=module, expert=True)):
            for param_name, param in named:
                if id(param) not in owner and param.requires_grad and (id(param) in experts) == spec.expert:
                    owner[id(param)] = len(units)
                    spec.named_params.append((_qualified(prefix, param_name), param))
            if spec.named_params:
                units.append(spec)
        used = sorted({owner[id(p)] for _, p in named if id(p) in owner})
        if used:
            sites.append(HookSite(name=name, module=module, unit_indices=used))
    return units, sites
