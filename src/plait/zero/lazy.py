"""Lazy initialisation: a model built on the meta device is materialised one unit at a time.

Each unit's parameters get real storage, are initialised exactly as a plain
build would (same order of draws from the same RNG), and are then flattened
and sharded by the caller before the next unit is touched, so a rank never
holds more than one unit's full parameters during set-up.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from plait.zero.partition import UnitSpec


def _param_sites(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) that holds each parameter, tied parameters included."""
    sites: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                sites[id(param)].append((module, attr))
    return sites


def _reset_owners(module: nn.Module, params: set[int]) -> None:
    """Models without `init_module`: each submodule owning one of `params` resets itself."""
    for sub in module.modules():
        owns = any(id(p) in params for p in sub._parameters.values() if p is not None)
        if owns and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()


class Materializer:
    """Give a meta-device unit real, initialised parameters on `device`.

    Units must be materialised in the model's init order for the weights to
    equal a plain build's (plait's GPT declares it with `init_order`/`init_module`).
    """

    def __init__(self, model: nn.Module, *, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.sites = _param_sites(model)

    @torch.no_grad()
    def __call__(self, spec: UnitSpec) -> list[tuple[str, nn.Parameter]]:
        materialized = []
        for name, param in spec.named_params:
            real = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device=self.device), requires_grad=param.requires_grad
            )
            for module, attr in self.sites[id(param)]:
                setattr(module, attr, real)
            materialized.append((name, real))
        init_module = getattr(self.model, "init_module", None)
        if init_module is not None:
            init_module(spec.module)
        else:
            _reset_owners(spec.module, {id(p) for _, p in materialized})
        return materialized
