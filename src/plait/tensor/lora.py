"""Tensor parallel for LoRA layers (peft's `lora.Linear`: `base_layer`, `lora_A`, `lora_B`), the Megatron way.

A column-parallel base keeps `lora_A` replicated and makes `lora_B` column-parallel: `lora_B` enters
the tensor-parallel region itself (identity forward, all-reduce backward), so `lora_A`'s gradient and
the input's are whole. A row-parallel base makes `lora_A` row-parallel (this rank's input features, its
output summed over tp) and keeps `lora_B` replicated. Under sequence parallel the replicated factor
sees one sequence chunk per rank, so its gradient is partial over tp and is marked like a norm's.

Only submodules of the instance are swapped (the base layer, and the factors inside peft's
ModuleDicts); peft's own forward runs unchanged on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from plait.tensor.layers import ColumnParallelLinear, RowParallelLinear
from plait.tensor.sequence import mark_sequence_parallel

if TYPE_CHECKING:
    from plait.tensor.apply import Context, Style

Build = Callable[[nn.Module, str, "Style", "Context"], nn.Module]  # plait.tensor.apply's builder of the style


def is_lora_layer(module: nn.Module) -> bool:
    """Whether `module` is a LoRA wrapper around a base layer (peft's layout)."""
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "base_layer")


def _check_plain(module: nn.Module, name: str, *, sequence_input: str | None) -> None:
    if not module.base_layer.weight.is_floating_point():
        raise ValueError(f"{name}: a base held in low-bit form (lora.quantize) cannot be split over tp; set plan.tp=1")
    if getattr(module, "lora_variant", None):  # DoRA and friends carry state shaped like the whole weight
        raise ValueError(f"{name}: LoRA variants (DoRA, ...) under plan.tp > 1 are not available; use plain LoRA")
    if any(not isinstance(layer, nn.Linear) for layer in [*module.lora_A.values(), *module.lora_B.values()]):
        raise ValueError(f"{name}: only LoRA factors that are nn.Linear can be split over tp")
    if any(isinstance(drop, nn.Dropout) and drop.p > 0 for drop in module.lora_dropout.values()):
        # tp ranks would drop different elements of the input the replicated lora_A sees, and its copies drift
        raise ValueError(f"{name}: LoRA dropout under plan.tp > 1 is not available; set lora.dropout=0")
    if any(layer.bias is not None for layer in module.lora_B.values()):
        raise ValueError(f"{name}: LoRA with lora_bias under plan.tp > 1 is not available; set lora_bias=False")
    if sequence_input is not None:
        raise ValueError(
            f"{name}: LoRA on a layer outside plait's sequence-parallel layers is not available; "
            "set plan.sequence_parallel=false"
        )


def shard_lora_layer(module: nn.Module, name: str, *, style: Style, ctx: Context, build: Build) -> nn.Module:
    """Split the LoRA wrapper `module` (named `name`) over tp in place: its base by `build` (the builder of
    `style`, "colwise" or "rowwise"), its factors to match (a fused column base's segments, `style.partition`,
    split lora_B alike)."""
    group = ctx.group
    sequence_parallel = ctx.sequence_parallel and style.sequence_input is None
    kind = style.kind
    if kind not in ("colwise", "rowwise"):
        raise ValueError(f"{name}: a LoRA layer can be split colwise or rowwise, not {kind!r}")
    _check_plain(module, name, sequence_input=style.sequence_input if ctx.sequence_parallel else None)
    module.base_layer = build(module.base_layer, f"{name}.base_layer", style, ctx)
    for adapter in list(module.lora_A):
        a_name, b_name = f"{name}.lora_A.{adapter}", f"{name}.lora_B.{adapter}"
        if kind == "colwise":
            module.lora_B[adapter] = ColumnParallelLinear.from_dense(
                module.lora_B[adapter],
                group=group,
                name=b_name,
                sequence_parallel=sequence_parallel,
                partition=style.partition,
            )
            replicated, replicated_name = module.lora_A[adapter], a_name
        else:
            module.lora_A[adapter] = RowParallelLinear.from_dense(
                module.lora_A[adapter], group=group, name=a_name, sequence_parallel=sequence_parallel
            )
            replicated, replicated_name = module.lora_B[adapter], b_name
        if sequence_parallel:
            mark_sequence_parallel(replicated, name_prefix=replicated_name)
    return module
