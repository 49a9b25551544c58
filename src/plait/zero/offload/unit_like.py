"""What offload needs of a flat unit (zero/unit.py's FlatUnit), as a protocol: offload sits below zero."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from plait.zero.offload.placement import UnitTiers
from plait.zero.offload.unit_pages import UnitPages


class UnitLike(Protocol):
    tiers: UnitTiers
    pages: UnitPages | None
    names: list[str]
    pieces: list[nn.Parameter]
    full: torch.Tensor
    param_shard: torch.Tensor
    master_shard: torch.Tensor
    grad_shard: torch.Tensor

    def publish_step(self) -> dist.Work | None: ...
